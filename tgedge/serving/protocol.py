"""The entry model's request and response tensors: declared once, read by the repository writer (its
config.pbtxt), the entry model (parsing a request) and the client (building one). Torch-free, Triton-free.

A request is the image file's bytes (or several images', or none: a text-only prompt) and the question, plus the
sampling options of `tgedge run`, and optionally a conversation id (the request is that conversation's next turn);
the response
stream is the answer's text as it grows (`text`, one piece per response, what `tgedge run` prints as it streams),
then one final response holding `answer`: the JSON object `tgedge run --json` prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from tgedge.errors import TgedgeError

ENTRY_MODEL = "tgedge"


def require_tritonclient(command: str) -> None:
    """Refuse in one line where tritonclient (and the protobuf it brings) is missing: `tgedge triton` writes configs
    through its schema, `client` and `loadtest` talk through it; the server side needs none of it."""
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError as e:
        raise TgedgeError(f"tgedge {command} needs tritonclient ({e.name} is missing): pip install 'tgedge[serve]'") \
            from None


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str  # numpy dtype name, or "bytes" (Triton TYPE_STRING / BYTES)
    dims: tuple[int, ...]  # -1: any length
    optional: bool = False
    help: str = ""
    bounds: tuple[int, int] | None = None  # an integer field's range, checked by client and server alike


INT31 = 2 ** 31 - 1


REQUEST = (
    Field("image", "uint8", (-1,), True, "the image file's bytes (PNG, JPEG, any format pillow reads); left out: a "
                                          "text-only prompt, the decoder alone"),
    Field("images", "bytes", (-1,), True, "several images, one file's bytes per element, placed in order (instead "
                                          "of image; one works too)"),
    Field("question", "bytes", (1,), help="the question, UTF-8; the model's chat template wraps it"),
    # int64 on the wire: Triton's HTTP/JSON reader casts a number into the declared type, so an int32 field
    # would wrap 4294967297 to 1 before the model sees it; as int64 it arrives whole and is refused by its bounds
    Field("max_new_tokens", "int64", (1,), True, "most tokens to generate (default 64)", (1, INT31)),
    Field("temperature", "float64", (1,), True, "0 = greedy (default); > 0 samples"),
    Field("top_k", "int64", (1,), True, "sample from the k most likely tokens (0 = off)", (0, INT31)),
    Field("top_p", "float64", (1,), True, "nucleus sampling mass in (0, 1]"),
    Field("seed", "int64", (1,), True, "sampling seed", (0, 2 ** 32 - 1)),
    Field("raw", "bool", (1,), True, "send the question verbatim (it must hold <image> once)"),
    Field("guide", "bytes", (1,), True, "the text the text guide encodes (default: the question; with raw, "
                                        "required for TG models: the question alone)"),
    Field("conversation", "bytes", (1,), True, "a conversation id: this request is its next turn, answered after "
                                               "the conversation so far, the server's KV cache reused (the images "
                                               "are the first turn's; docs/SERVING.md)"),
    Field("conversation_guide", "bytes", (1,), True, "what guides a TG conversation's images: latest (default; the "
                                                     "newest question) or first (the first turn's, faster)"),
)
RESPONSE = (
    Field("text", "bytes", (1,), help="the next piece of the answer's text (streamed)"),
    Field("answer", "bytes", (1,), help="final response only: JSON with text, tokens, prompt_tokens, timings (and for "
                                        "a conversation's turn: conversation, turn, reused_tokens, recomputed, "
                                        "vision_cached)"),
)


def bound_problem(f: Field, value) -> str | None:
    """Why an integer field cannot take `value` (its declared bounds), or None."""
    if f.bounds is None:
        return None
    lo, hi = f.bounds
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        return f"must be an integer in [{lo}, {hi}] (got {value!r})"
    return None


# A served conversation's bounds per entry instance (serving.conversations): the KV caches kept (the repository's
# `conversations` parameter, `tgedge triton --conversations`), and the histories remembered per cache kept.
CONVERSATIONS = 8
KEPT_PER_CACHED = 32

# The options' defaults are `tgedge run`'s.
DEFAULTS = {"image": None, "images": None, "max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
            "seed": 0, "raw": False, "guide": None, "conversation": None, "conversation_guide": "latest"}
PROMPT_FIELDS = ("image", "images", "raw", "guide", "conversation", "conversation_guide")
# The sampling options (tgedge.sampling.GenerationOptions); the other optional fields shape the prompt instead.
OPTIONS = tuple(f.name for f in REQUEST if f.optional and f.name not in PROMPT_FIELDS)

TRITON_TYPES = {"bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int32": "TYPE_INT32",
                "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
                "bytes": "TYPE_STRING"}
# The names Triton's inference protocol (and tritonclient's InferInput) gives the same types.
WIRE_TYPES = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int32": "INT32", "int64": "INT64",
              "float16": "FP16", "float32": "FP32", "float64": "FP64", "bytes": "BYTES"}
