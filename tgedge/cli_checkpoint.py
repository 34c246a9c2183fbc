"""CLI commands that make checkpoints: `tgedge checkpoint random` and `tgedge checkpoint presets`."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

from tgedge.cli_common import EPILOG, SEED, add_output, integer, text

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """argparse type: '5GB', '500MB', '2GiB' or a byte count -> bytes (decimal units, as transformers' shards)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", text, re.IGNORECASE)
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]) if m else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or 2GiB, got {text!r}")
    return size


def outlier_count(value: str) -> int:
    """argparse type: `none` (0) or a channel count."""
    return 0 if value == "none" else integer(0)(value)


def register(sub) -> None:
    from tgedge.presets import DTYPES, PRESETS
    from tgedge.presets_init import DEFAULT_OUTLIERS, INITS, OUTLIER_GAIN

    p = sub.add_parser("checkpoint", help="make checkpoints: random weights at real TG-LLaVA / LLaVA sizes",
                       description="Make checkpoints without downloads. `random` writes random weights at the real "
                                   "sizes (for memory, time and shape tests: the answers are noise); `presets` lists "
                                   "what it can write.", epilog=EPILOG)
    kinds = p.add_subparsers(dest="checkpoint_command", metavar="SUBCOMMAND", required=True)
    r = kinds.add_parser(
        "random", help="write a random-weight checkpoint at a real size (original TG-LLaVA layout + CLIP dir)",
        description="Write a checkpoint with random weights in the original TG-LLaVA / LLaVA layout (config.json "
                    "with mm_* keys, model.*.safetensors, a synthetic tokenizer.json of the real vocabulary size) and "
                    "its CLIP directory in DIR/clip (both towers, CLIP tokenizer, image processor), tensor by tensor "
                    "so that memory stays small. The same preset and seed give byte-identical files. The weights are "
                    "random: use it for memory, time and shape tests, never for quality.", epilog=EPILOG)
    r.add_argument("--preset", metavar="NAME", required=True,
                   help=f"what to write: {', '.join(PRESETS)} (`tgedge checkpoint presets` lists their sizes)")
    add_output(r, "checkpoint directory to write, with the CLIP directory in DIR/clip; an earlier output of this "
                  "command is replaced")
    r.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")
    r.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weight dtype (default bf16, as released)")
    r.add_argument("--max-shard-size", metavar="SIZE", type=parse_size, default="5GB",
                   help="largest weight file, e.g. 5GB (default), 500MB; larger models are split into shards "
                        "listed in model.safetensors.index.json")
    r.add_argument("--init", choices=INITS, default="realistic",
                   help="realistic (default): variance-preserving weights with gains for trained models' statistics "
                        "(residual stream growing with depth, peaked attention, sharp next-token distributions); "
                        "flat: every weight N(0, 0.02), the files earlier versions wrote (docs/SCALE.md)")
    r.add_argument("--outliers", metavar="N|none", type=outlier_count, default=None,
                   help=f"activation outlier channels per tower (decoder, vision tower): N norm-weight channels "
                        f"{OUTLIER_GAIN:g}x the rest, the next Linear's columns scaled down to match; default "
                        f"{DEFAULT_OUTLIERS} with --init realistic, none with --init flat")
    r.add_argument("--json", action="store_true", help="print the result (files, sizes, parameters) as JSON")
    r.set_defaults(func=cmd_random)
    st = kinds.add_parser(
        "stats", help="activation and logit statistics of a checkpoint on one image and question",
        description="Run the PyTorch reference once on an image and question and report what decides how hard the "
                    "model is to deploy: each stage's output std and max, the residual stream per layer of the vision "
                    "tower and the decoder, the outlier ratio of their normalised activations (max channel rms / "
                    "median), the last-position logit std and top-1 probability quantiles over greedy positions. "
                    "Compares random presets with real checkpoints (docs/SCALE.md).", epilog=EPILOG)
    st.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory, or `demo`")
    st.add_argument("--clip", metavar="DIR", help="CLIPModel directory for original-layout checkpoints (default for "
                                                 "a `checkpoint random` output: its CKPT/clip)")
    st.add_argument("--image", metavar="PATH", help="image (default: a built-in picture of shapes)")
    st.add_argument("--prompt", metavar="TEXT", type=text, default="What is in the picture?",
                    help="question (default: 'What is in the picture?')")
    st.add_argument("--max-new-tokens", type=integer(1), default=16,
                    help="greedy positions for the top-1 quantiles (default 16; end-of-sequence does not stop them)")
    st.add_argument("--sensitivity", action="store_true",
                    help="also round the decoder's weights to 8 bits per output channel and report how far the "
                         "teacher-forced logits move (top-1 agreement, min cosine): near 1 on trained checkpoints; "
                         "a random init far below it is chaotic (two more decoder passes)")
    st.add_argument("--json", action="store_true", help="print the statistics as JSON")
    st.set_defaults(func=cmd_stats)
    s = kinds.add_parser("presets", help="list the presets with parameter counts and sizes",
                         description="The presets `tgedge checkpoint random` writes: layout, decoder, parameters "
                                     "(all stored tensors, and those tgedge loads) and weight bytes.", epilog=EPILOG)
    s.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype the sizes are given for (default bf16)")
    s.add_argument("--json", action="store_true", help="print the list as JSON")
    s.set_defaults(func=cmd_presets)


def cmd_presets(args) -> int:
    from tgedge.presets import PRESETS, size_text, summary

    rows = [summary(p, args.dtype) for p in PRESETS.values()]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'preset':<18}{'decoder':<22}{'TG':<4}{'parameters':>11}{'loaded':>11}{'weights':>11}")
    for row in rows:
        n = row["parameters"]
        print(f"{row['preset']:<18}{row['decoder']:<22}{'yes' if row['tg'] else 'no':<4}{_count(n['total']):>11}"
              f"{_count(n['loaded']):>11}{size_text(row['weight_bytes']):>11}")
    print(f"weights at {args.dtype}; loaded: what tgedge uses (the rest is saved by the reference, unused)\n"
          "all weights are random: for memory, time and shape tests only")
    return 0


def cmd_random(args) -> int:
    from tqdm import tqdm

    from tgedge.presets import CLIP_SUBDIR, get, plan, size_text, write_random

    preset = get(args.preset)
    start = time.perf_counter()
    with tqdm(total=len(plan(preset)), desc=preset.name, unit="tensor", disable=None, file=sys.stderr) as bar:
        info = write_random(preset.name, args.output, args.seed, args.dtype, args.max_shard_size,
                            progress=lambda spec: bar.update(), force=args.force, init=args.init,
                            outliers=args.outliers)
    out = Path(args.output)
    clip = out / CLIP_SUBDIR
    run = (f"tgedge run {shlex.quote(str(out))} --clip {shlex.quote(str(clip))} --image IMAGE "
           f"--prompt 'What is in the picture?'")
    result = {**info, "path": str(out), "clip": str(clip), "seconds": round(time.perf_counter() - start, 3),
              "run": run}
    if args.json:
        print(json.dumps(result))
        return 0
    n = info["parameters"]
    outliers = f"{info['outliers']} outlier channels per tower" if info["outliers"] else "no outlier channels"
    print(f"wrote {preset.name}: {n['total']:,} parameters ({n['loaded']:,} loaded by tgedge), random {args.dtype} "
          f"weights (seed {args.seed}, {info['init']} init, {outliers}), {size_text(info['bytes'])} in "
          f"{result['seconds']:.1f} s")
    print(f"  {out}  checkpoint ({preset.model_type}, original LLaVA layout)")
    print(f"  {clip}  CLIP towers, tokenizer and image processor")
    print("random weights: for memory, time and shape tests only; the answers are noise")
    print(f"run it with:\n  {run}")
    return 0


def cmd_stats(args) -> int:
    from tgedge.model_stats import checkpoint_stats, format_stats

    # a `checkpoint random` output needs no --clip: the original layout's reader finds CKPT/clip by its marker
    stats = checkpoint_stats(args.checkpoint, args.clip, args.image, args.prompt, args.max_new_tokens,
                             sensitivity=args.sensitivity)
    print(json.dumps(stats) if args.json else format_stats(stats))
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
