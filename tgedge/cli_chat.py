"""`tgedge chat`: a conversation about images, one question per line of standard input (docs/CONVERSATIONS.md).

By default each line is a follow-up turn of one conversation (`tgedge.conversation.Conversation`: the KV cache kept
between turns, only what changed prefilled); with `--independent` each line is a fresh single-turn question,
answered exactly as `tgedge run` answers it. Either way the vision stage's output comes from the stage cache
(`tgedge.stagecache`) after the first question about an image. `/image PATH [PATH ...]` switches the images and
`/reset` starts the conversation over.
"""

from __future__ import annotations

import json
import shlex
import sys

from tgedge.cli_common import BACKENDS, EPILOG, integer
from tgedge.conversation import GUIDES, Conversation
from tgedge.errors import TgedgeError

DEFAULT_CACHE_MB = 256  # the real-shape TG preset's 5 views of CLIP ViT-L/336 are about 12 MB an image
COMMANDS = "/image PATH [PATH ...] (other images, a new conversation), /reset (start over)"


def register(sub) -> None:
    p = sub.add_parser(
        "chat", help="answer questions about an image, one per line of standard input",
        description="Read one question per line of standard input and answer each about the image. --independent: "
                    "each line is a fresh single-turn question (the answer equals `tgedge run` of it), the vision "
                    "stage's output cached between them. By default the lines are turns of one conversation: each "
                    "answer follows the whole conversation so far, the KV cache kept between turns and only the "
                    f"positions that changed prefilled. Commands on a line of their own: {COMMANDS}.",
        epilog=EPILOG)
    p.add_argument("model", help="checkpoint directory, `demo`, or an export directory (tgedge export)")
    p.add_argument("--image", required=True, action="append", metavar="PATH",
                   help="image file (any format pillow reads); repeat it for several images, placed in order")
    p.add_argument("--independent", action="store_true",
                   help="each line a fresh single-turn question about the image(s), not a follow-up")
    p.add_argument("--guide", choices=GUIDES, default="latest",
                   help="what guides the images of a follow-up in TG-LLaVA and the gated family, whose image tokens "
                        "depend on the question: latest (default; the newest question, as TG-LLaVA's training "
                        "guides a conversation: the image tokens and what follows are prefilled again), first (the "
                        "image tokens the first question guided are kept: only the new turn is prefilled; faster, "
                        "but TG-FOM and TG-DP do not steer by the new question). Plain LLaVA reuses the whole "
                        "prefix either way")
    p.add_argument("--backend", choices=BACKENDS,
                   help="torch for a checkpoint (default), a runtime backend for an export directory (default "
                        "onnxruntime)")
    p.add_argument("--clip", metavar="DIR", help="CLIPModel directory for original-layout checkpoints")
    p.add_argument("--max-new-tokens", type=integer(1), default=64, help="most tokens per answer (default 64)")
    p.add_argument("--max-context", type=integer(1), help="KV-cache length (default: the model's max positions)")
    p.add_argument("--vision-cache-mb", type=integer(0), default=DEFAULT_CACHE_MB,
                   help=f"bound of the vision-feature cache in MiB (default {DEFAULT_CACHE_MB}; 0 turns it off)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per answer: text, tokens, prompt_tokens, reused_tokens, vision_cached, "
                        "timings")
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


def command(line: str) -> tuple[str, list[str]] | None:
    """A `/name args` line -> (name, args); None for a question."""
    if not line.startswith("/"):
        return None
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise TgedgeError(f"command {line!r}: {e}") from None
    name, args = words[0], words[1:]
    if name == "/reset" and not args or name == "/image" and args:
        return name, args
    raise TgedgeError(f"{line!r} is not a command; commands: {COMMANDS}")


def cmd_chat(args) -> int:
    from tgedge.pipelines import open_pipeline
    from tgedge.preprocess import load_image
    from tgedge.stagecache import StageCache

    images = [load_image(p) for p in args.image]  # before any question is read: a bad image is refused up front
    pipe = open_pipeline(args.model, args.backend, args.clip, args.max_context, not args.no_verify)
    cache = StageCache(args.vision_cache_mb << 20) if args.vision_cache_mb else None
    pipe.use_stage_cache(cache)
    options = pipe.options(max_new_tokens=args.max_new_tokens)
    conversation = None if args.independent else Conversation(pipe, images, args.guide)
    interactive = sys.stdin.isatty()
    stream = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    if interactive:
        print(f"one question per line; {COMMANDS}; Ctrl-D ends", file=sys.stderr)
    try:
        for line in questions(sys.stdin.buffer):
            try:
                images = turn(pipe, conversation, images, line, options, stream, cache, args.json)
            except TgedgeError as e:
                if not interactive:
                    raise
                print(f"tgedge: error: {e}", file=sys.stderr)  # a person at a terminal keeps the session
    finally:
        if conversation is not None:
            conversation.close()
    return 0


def turn(pipe, conversation, images, line, options, stream, cache, as_json):
    """One line: a command, or a question answered (printed); the images from now on."""
    from tgedge.preprocess import load_image

    cmd = command(line)
    if cmd is not None:
        name, paths = cmd
        if name == "/image":
            images = [load_image(p) for p in paths]
        if conversation is not None and name == "/image":
            conversation.set_images(images)
        elif conversation is not None:
            conversation.reset()
        return images
    if conversation is not None:
        answer = conversation.ask(line, options, on_text=stream)
        record = answer.to_dict()
    else:
        answer = pipe.answer(images, line, options, on_text=stream)
        record = {**answer.to_dict(), "reused_tokens": 0,
                  "vision_cached": bool(cache is not None and cache.last_hit.get("vision"))}
    if as_json:
        print(json.dumps(record), flush=True)
    else:
        print(flush=True)
    return images
