"""`tgedge chat`: many questions about one image, one per line of standard input (docs/CONVERSATIONS.md).

With `--independent` each line is a fresh single-turn question, answered exactly as `tgedge run` answers it; the
vision stage's output comes from the stage cache after the first (`tgedge.stagecache`). Conversations (each line a
follow-up, the KV cache kept between turns) are not built yet: `chat` without `--independent` says so.
"""

from __future__ import annotations

import json
import sys

from tgedge.cli_common import BACKENDS, EPILOG, integer, one_image
from tgedge.errors import TgedgeError

DEFAULT_CACHE_MB = 256  # the real-shape TG preset's 5 views of CLIP ViT-L/336 are about 12 MB an image


def register(sub) -> None:
    p = sub.add_parser(
        "chat", help="answer questions about an image, one per line of standard input",
        description="Read one question per line of standard input and answer each about the image. --independent: "
                    "each line is a fresh single-turn question (the answer equals `tgedge run` of it), the vision "
                    "stage's output cached between them. Follow-up turns (a conversation reusing the KV cache) are "
                    "not implemented yet.", epilog=EPILOG)
    p.add_argument("model", help="checkpoint directory, `demo`, or an export directory (tgedge export)")
    p.add_argument("--image", required=True, action="append", metavar="PATH",
                   help="image file (any format pillow reads); one image for now (a second is refused)")
    p.add_argument("--independent", action="store_true",
                   help="each line a fresh single-turn question about the image (required for now)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="torch for a checkpoint (default), a runtime backend for an export directory (default "
                        "onnxruntime)")
    p.add_argument("--clip", metavar="DIR", help="CLIPModel directory for original-layout checkpoints")
    p.add_argument("--max-new-tokens", type=integer(1), default=64, help="most tokens per answer (default 64)")
    p.add_argument("--max-context", type=integer(1), help="KV-cache length (default: the model's max positions)")
    p.add_argument("--vision-cache-mb", type=integer(0), default=DEFAULT_CACHE_MB,
                   help=f"bound of the vision-feature cache in MiB (default {DEFAULT_CACHE_MB}; 0 turns it off)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per answer: text, tokens, prompt_tokens, vision_cached, timings")
    p.add_argument("--no-verify", action="store_true", help="skip the check of an export's graph fingerprints")
    p.set_defaults(func=cmd_chat)


def questions(stream):
    """Each non-blank line of a binary stream, as text (a line that is not UTF-8 is a user error naming it)."""
    for number, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise TgedgeError(f"standard input line {number}: not valid UTF-8 text (byte "
                              f"{raw[e.start:e.start + 1]!r} at {e.start})") from None
        if line.strip():
            yield line


def cmd_chat(args) -> int:
    path = one_image(args.image, "chat")
    if not args.independent:
        raise TgedgeError("chat without --independent (follow-up turns reusing the KV cache) is not implemented "
                          "yet: pass --independent to ask each line as a fresh question about the image")
    from tgedge.pipelines import open_pipeline
    from tgedge.preprocess import load_image
    from tgedge.stagecache import StageCache

    image = load_image(path)  # once, before any question is read: a bad image is refused up front
    pipe = open_pipeline(args.model, args.backend, args.clip, args.max_context, not args.no_verify)
    cache = StageCache(args.vision_cache_mb << 20) if args.vision_cache_mb else None
    pipe.use_stage_cache(cache)
    options = pipe.options(max_new_tokens=args.max_new_tokens)
    interactive = sys.stdin.isatty()
    stream = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    if interactive:
        print("one question per line; Ctrl-D ends", file=sys.stderr)
    for question in questions(sys.stdin.buffer):
        answer = pipe.answer(image, question, options, on_text=stream)
        if args.json:
            cached = bool(cache is not None and cache.last_hit.get("vision"))
            print(json.dumps({**answer.to_dict(), "vision_cached": cached}), flush=True)
        else:
            print(flush=True)
    return 0
