"""What the CLI modules share: backends, the epilog, the parser, option types."""

from __future__ import annotations

import argparse
import math

from tgedge.runtime.backends import BACKENDS as RUNTIME_BACKENDS

BACKENDS = ["torch", *RUNTIME_BACKENDS]  # the reference, then the runtime registry (tgedge.runtime.backends)
EPILOG = ("Exit codes: 0 ok, 1 a check failed, 2 bad input, 3 internal error (a bug), 130 interrupted. "
          "Add --debug for a traceback. docs/ERRORS.md lists the rules.")
SEED_MAX = 2 ** 32 - 1  # numpy, torch and Python's random all take it
OPSET_MIN = 14  # export.onnx_export.MIN_OPSET (Trilu), not imported here: that module imports torch


class _Once(argparse._StoreAction):
    """argparse's `store`, refusing a second value: `--prompt a --prompt b` silently answered `b`."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_tgedge_given", {})
        if self.option_strings and self.dest in seen:
            first, before = seen[self.dest]
            raise argparse.ArgumentError(self, f"given twice ({first} {before!r}, then {option_string} {values!r}): "
                                               "give it once")
        seen[self.dest] = (option_string, values)
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line in tgedge's form (`tgedge: error: ...`), exit 2, no usage block; a
    single-value option given twice is an error, not the last winning (`_Once`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, _Once)  # argument groups share this registry
        self.register("action", "store", _Once)

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        parsed.__dict__.pop("_tgedge_given", None)
        return parsed, extra

    def error(self, message: str):
        self.exit(2, f"tgedge: error: {message} (see {self.prog} --help)\n")


def _bounds(lo, hi, lo_open: bool = False) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}]"


def integer(lo: int, hi: int | None = None):
    """argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {_bounds(lo, hi)}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi)}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def real(lo: float, hi: float | None = None, lo_open: bool = False):
    """argparse type: a finite number in [lo, hi] (or (lo, hi] with lo_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {_bounds(lo, hi, lo_open)}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {_bounds(lo, hi, lo_open)}, got {text!r}")
        if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi, lo_open)}, got {text}")
        return value
    parse.__name__ = "real"
    return parse


SEED = integer(0, SEED_MAX)


def comma_list(value: str, what: str, convert=str) -> list:
    """The items of a comma-separated option value, each through `convert`: no empty item (`1,,2`), none twice
    (`torch,torch`): either would be a typo run as something else."""
    parts = [v.strip() for v in value.split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {value!r}")
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{value!r}: an empty item in the comma-separated list of {what}")
    try:
        items = [convert(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of {what}") from None
    twice = list(dict.fromkeys(str(i) for i in items if items.count(i) > 1))
    if twice:
        raise argparse.ArgumentTypeError(f"{value!r}: {', '.join(twice)} given twice in the list of {what}")
    return items


def sampling(args) -> dict:
    """--temperature, --top-k, --top-p, --seed as options; the last three shape sampling, so at --temperature 0
    (greedy, the default) they would change nothing and are refused (their defaults: 0 = off, 1.0 = off, 0)."""
    given = [flag for flag, v in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
             if v is not None]
    if given and not args.temperature:
        from tgedge.errors import TgedgeError

        raise TgedgeError(f"{given[0]} shapes sampling, and at --temperature 0 (greedy, the default) it changes "
                          "nothing: pass --temperature T > 0 to sample, or leave it out")
    return {"temperature": args.temperature, "top_k": args.top_k or 0,
            "top_p": 1.0 if args.top_p is None else args.top_p, "seed": args.seed or 0}


def text(value: str) -> str:
    """argparse type: non-empty text that is valid UTF-8 (argv bytes that are not arrive as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start].encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text (byte {bad!r} at character {e.start})") from None
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def opset(value: str) -> int:
    """argparse type: an ONNX opset tgedge's graphs can use and the installed exporter writes
    (`tgedge.export.onnx_export.newest_opset`; imported here, with torch, only when --opset is given to export)."""
    try:
        from tgedge.export.onnx_export import newest_opset
    except ImportError:  # no torch or onnx: export itself says which is missing
        return integer(OPSET_MIN)(value)
    return integer(OPSET_MIN, newest_opset())(value)


def add_output(p, help: str) -> None:
    """-o/--output and --force, the same on every command that writes a directory."""
    p.add_argument("-o", "--output", required=True, help=help + "; it must be new, empty, or an earlier tgedge "
                                                            "output of the same kind (docs/ERRORS.md)")
    p.add_argument("--force", action="store_true",
                   help="replace -o even if it holds other files (never an input or the working directory)")
