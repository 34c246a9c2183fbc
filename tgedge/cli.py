"""The `tgedge` command line. Each subcommand lives in a small function; heavy imports happen inside them."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import traceback

from tgedge import __version__, cli_bench, cli_chat, cli_checkpoint, cli_deploy, cli_device
from tgedge.cli_common import BACKENDS, EPILOG, SEED, Parser, add_output, integer, real, sampling, text

MAX_SAMPLES = 1_000_000  # `data shapes -n`: ~27 GB of 112 px PNGs; beyond it is a typo, not a data set
from tgedge.contract import FAMILIES, ablation_choices
from tgedge.errors import TgedgeError, as_user_error, one_line
from tgedge.pipelines import open_pipeline


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="answer a question about an image (a checkpoint, or an export directory)",
        description="Answer a question about an image. The answer streams to stdout; --json prints one object "
                    "with text, tokens, prompt_tokens and timings instead.", epilog=EPILOG)
    p.add_argument("checkpoint", help="checkpoint directory (Hugging Face LLaVA, original TG-LLaVA or tgedge layout), "
                                      "`demo` for the embedded demo model, or an export directory (tgedge export)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="torch (the PyTorch reference; the default for a checkpoint) or a runtime backend for an "
                        "export directory (default onnxruntime, i.e. CPU)")
    p.add_argument("--image", required=True, action="append", metavar="PATH",
                   help="image file (any format pillow reads); repeat it for several images, placed in order at the "
                        "prompt's image places (docs/CONVERSATIONS.md)")
    p.add_argument("--prompt", required=True, type=text, help="the question; the model's chat template wraps it")
    p.add_argument("--raw", action="store_true",
                   help="use --prompt verbatim (it must contain <image> once per --image); a TG model then needs "
                        "--guide")
    p.add_argument("--guide", metavar="TEXT", type=text,
                   help="the text the text guide encodes (default: the question; with --raw, required for TG models: "
                        "the question alone, as TG-LLaVA guides with it)")
    p.add_argument("--clip", metavar="DIR", help="transformers CLIPModel directory for original-layout checkpoints")
    p.add_argument("--max-new-tokens", type=integer(1), default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=real(0), default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=integer(0), help="sample from the k most likely tokens (0 = off, the default; with "
                   "--temperature > 0)")
    p.add_argument("--top-p", type=real(0, 1, lo_open=True),
                   help="nucleus sampling mass in (0, 1] (default 1.0 = off; with --temperature > 0)")
    p.add_argument("--seed", type=SEED, help="sampling seed (default 0; with --temperature > 0)")
    p.add_argument("--max-context", type=integer(1), help="KV-cache length (default: the model's max positions)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check that an export's graphs are the ones its manifest describes (a fingerprint: "
                        "size + first and last MiB)")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    image = args.image[0] if len(args.image) == 1 else args.image
    if args.raw:  # the marker count, before the model loads
        from tgedge.prompt import check_raw_prompt

        check_raw_prompt(args.prompt, len(args.image))
    pipe = open_pipeline(args.checkpoint, args.backend, args.clip, args.max_context, not args.no_verify)
    options = pipe.options(max_new_tokens=args.max_new_tokens, **sampling(args))
    stream = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    answer = pipe.answer(image, args.prompt, options, raw=args.raw, on_text=stream, guide=args.guide)
    if args.json:
        print(json.dumps(answer.to_dict()))
    else:
        print()
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="write task data folders (images + samples.jsonl)",
                       description="Write a data folder of the demo task (docs/DATA.md).", epilog=EPILOG)
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    s = kinds.add_parser("shapes", help="coloured shapes on a 3x3 grid with short-answer questions",
                         description="Pictures of 1-5 coloured shapes with questions about colour, position, count, "
                                     "presence and small details. The same split and seed give identical files.")
    s.add_argument("--split", choices=["train", "calibration", "eval"], default="eval",
                   help="which split's seed and default size (train 10000, calibration 256, eval 1000)")
    s.add_argument("--seed", type=SEED, help="another seed: a fresh set from the same distribution")
    s.add_argument("-n", "--count", type=integer(1, MAX_SAMPLES), metavar="N",
                   help=f"number of samples, at most {MAX_SAMPLES:,} (default: the split's size)")
    s.add_argument("--size", type=integer(24, 4096), default=112, help="image side in pixels, 24 to 4096 (default 112)")
    add_output(s, "output data folder")
    s.set_defaults(func=cmd_data_shapes)


def cmd_data_shapes(args) -> int:
    from tqdm import tqdm

    from tgedge.data import shapes
    from tgedge.data.folder import write_folder

    seed = shapes.SPLIT_SEEDS[args.split] if args.seed is None else args.seed
    count = shapes.SPLIT_SIZES[args.split] if args.count is None else args.count
    with tqdm(total=count, desc=f"shapes/{args.split}", unit="sample", disable=None) as bar:
        out = write_folder(shapes.generate(seed, count, args.size), args.output, progress=bar.update, force=args.force)
    print(f"wrote {count} samples (split {args.split}, seed {seed}) to {out}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="task accuracy of a model on a data folder",
                       description="Greedy answers for every sample of a data folder, exact match against its "
                                   "answers: overall and per question type, with the majority-answer chance level "
                                   "and the first 20 failures.", epilog=EPILOG)
    p.add_argument("model", help="checkpoint directory, `demo` for the embedded demo model, or an export directory")
    p.add_argument("--data", required=True, help="data folder (images/ + samples.jsonl)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="torch for a checkpoint (default), a runtime backend for an export directory (default onnxruntime)")
    p.add_argument("--limit", type=integer(1), help="evaluate the first N samples only")
    p.add_argument("--clip", metavar="DIR", help="CLIPModel directory for original-layout checkpoints")
    p.add_argument("--max-new-tokens", type=integer(1), default=8, help="answer length cap (default 8)")
    p.add_argument("--ablate", choices=ablation_choices(),
                   help="switch modules off at inference: fom zeroes TG-FOM's zero_layer, dp drops TG-DP's tokens, both; "
                        "for a gated-fusion model, gate forces g = 0 (image only) and text removes the text context")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from tgedge.data.folder import read_folder
    from tgedge.evaluate import evaluate
    from tgedge.reference import TorchPipeline

    records = read_folder(args.data)[: args.limit]
    pipe = open_pipeline(args.model, args.backend, args.clip)
    if args.ablate:
        if not isinstance(pipe, TorchPipeline):
            raise TgedgeError("--ablate switches modules of the PyTorch reference: pass a checkpoint")
        pipe.ablate(args.ablate)
    options = pipe.options(max_new_tokens=args.max_new_tokens)
    answer = lambda image, prompt: pipe.answer(image, prompt, options).text  # noqa: E731
    with tqdm(total=len(records), desc="eval", unit="sample", disable=None, file=sys.stderr) as bar:
        report = evaluate(answer, records, progress=bar.update)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.model} on {args.data}")
    for col in ("type", "n", "accuracy", "chance"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for kind, r in report.per_type.items():
        table.add_row(kind, str(r["n"]), f"{100 * r['accuracy']:.1f}%", f"{100 * r['chance']:.1f}%")
    table.add_row("all", str(report.total), f"{100 * report.accuracy:.1f}%", f"{100 * report.chance:.1f}%")
    console = Console()
    console.print(table)
    for f in report.failures:
        console.print(f"  line {f['line']} {f['image']}: {f['prompt']!r} expected {f['expected']!r} got {f['got']!r}",
                      markup=False)
    return 0


def _add_train_demo(sub) -> None:
    p = sub.add_parser("train-demo", help="train a small demo model (TG-LLaVA, gated fusion or plain LLaVA) from "
                                          "scratch on the shapes task",
                       description="Staged training (towers on dense labels, then answers) of the demo model; "
                                   "seeded, data generated on the fly. Writes a checkpoint in tgedge's layout with "
                                   "train_log.jsonl and train_settings.json. The defaults are the shipped model's "
                                   "command (58 min on 2 idle CPU cores); --fusion picks the fusion family, with "
                                   "the same sizes for the shared parts and the same budget.",
                       epilog=EPILOG)
    add_output(p, "output checkpoint folder")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--vision-steps", type=integer(1), default=4000, help="stage-1 steps (towers on dense labels)")
    p.add_argument("--answer-steps", type=integer(1), default=4500, help="stage-2 steps (answers)")
    p.add_argument("--batch", type=integer(1, 4096), default=48)
    p.add_argument("--lr", type=real(0, lo_open=True), default=1e-3)
    p.add_argument("--vision-lr-scale", type=real(0), default=0.1,
                   help="stage 2 fine-tunes the vision tower at lr x this (0 freezes it; default 0.1)")
    p.add_argument("--fusion", choices=list(FAMILIES),
                   help="fusion family: tg (TG-FOM + TG-DP, the shipped demo; default), gated (gated cross-modal "
                        "fusion, demo-gated), plain (LLaVA, no text guide)")
    p.add_argument("--gate-strategy", choices=["adaptive_gating", "attention_weights"],
                   help="--fusion gated: sigmoid gate (adaptive_gating, default) or softmax modality weights")
    p.add_argument("--no-tg", action="store_true", help="the same as --fusion plain (the ablation of the TG modules)")
    p.set_defaults(func=cmd_train_demo)


def cmd_train_demo(args) -> int:
    from pathlib import Path

    from tgedge.fileio import check_output
    from tgedge.train_demo import TrainSettings, train_demo

    if args.no_tg and args.fusion not in (None, "plain"):
        raise TgedgeError(f"--no-tg means --fusion plain; it cannot be combined with --fusion {args.fusion}")
    fusion = "plain" if args.no_tg else args.fusion or "tg"
    if args.gate_strategy and fusion != "gated":
        raise TgedgeError(f"--gate-strategy is for --fusion gated (this run trains {fusion})")
    cfg = TrainSettings(seed=args.seed, vision_steps=args.vision_steps, answer_steps=args.answer_steps,
                        batch=args.batch, lr=args.lr, vision_lr_scale=args.vision_lr_scale)
    check_output(args.output, "checkpoint", force=args.force)  # before an hour of training, not after
    out = train_demo(Path(args.output), cfg, fusion, args.gate_strategy or "adaptive_gating", force=args.force)
    print(f"wrote {out}")
    return 0


def build_parser() -> Parser:
    parser = Parser(
        prog="tgedge", description="Export, quantise, run and validate text-guided vision-language models "
                                   "(TG-LLaVA family) for NVIDIA Jetson and desktop GPUs.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"tgedge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    _add_data(sub)
    _add_eval(sub)
    cli_chat.register(sub)
    cli_deploy.register(sub)
    cli_device.register(sub)
    cli_bench.register(sub)
    cli_checkpoint.register(sub)
    from tgedge import cli_serve
    cli_serve.register(sub)
    _add_train_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The one error boundary: a user error is one line and exit 2, an interrupt 130, a bug a traceback and 3."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line argument error (Parser.error)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="tgedge: %(message)s")
    previous = _terminate_like_interrupt()
    try:
        return args.func(args)
    except Terminated:
        print("tgedge: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("tgedge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        error = as_user_error(e)
        if error is None:
            traceback.print_exc()
            print("tgedge: internal error (a bug in tgedge, not in your input): please report it with the "
                  "traceback above", file=sys.stderr)
            return 3
        print(f"tgedge: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a plain `kill`, a service manager stopping tgedge): unwound like Ctrl-C, so that nothing
    half-written is left (the temporary output folder is removed); exit 143."""


def _terminate_like_interrupt():
    """Make SIGTERM raise `Terminated` in the main thread; -> the previous handler (None where none was set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, terminate)


if __name__ == "__main__":
    sys.exit(main())
