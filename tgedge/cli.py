"""The `tgedge` command line. Each subcommand lives in a small function; heavy imports happen inside them."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tgedge import __version__
from tgedge.errors import TgedgeError

EPILOG = "Exit codes: 0 ok, 1 a check failed, 2 bad input. Add --debug for a traceback."


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="answer a question about an image with a checkpoint",
        description="Answer a question about an image. The answer streams to stdout; --json prints one object "
                    "with text, tokens, prompt_tokens and timings instead.", epilog=EPILOG)
    p.add_argument("checkpoint", help="checkpoint directory (Hugging Face LLaVA, original TG-LLaVA or tgedge layout)")
    p.add_argument("--image", required=True, help="image file (any format pillow reads)")
    p.add_argument("--prompt", required=True, help="the question; the model's chat template wraps it")
    p.add_argument("--raw", action="store_true", help="use --prompt verbatim (it must contain <image> once)")
    p.add_argument("--clip", metavar="DIR", help="transformers CLIPModel directory for original-layout checkpoints")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-context", type=int, help="KV-cache length (default: the model's max positions)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from tgedge.reference import TorchPipeline

    pipe = TorchPipeline.from_checkpoint(args.checkpoint, args.clip, args.max_context)
    options = pipe.options(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed)
    stream = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    answer = pipe.answer(args.image, args.prompt, options, raw=args.raw, on_text=stream)
    if args.json:
        print(json.dumps(answer.to_dict()))
    else:
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tgedge", description="Export, quantise, run and validate text-guided vision-language models "
                                   "(TG-LLaVA family) for NVIDIA Jetson and desktop GPUs.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"tgedge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="tgedge: %(message)s")
    try:
        return args.func(args)
    except TgedgeError as e:
        if args.debug:
            raise
        print(f"tgedge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tgedge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
