"""Preprocessing shared by the reference and the runtime: numpy + pillow + tokenizers, no torch.

Image: CLIP processing (RGB, resize shortest edge with its resample, center crop, rescale, normalise),
LLaVA-1.5 pad-to-square with the mean colour (`int(mean * 255)`), and TG-DP's x2 view: the normalised
pixel tensor upsampled x2 (bilinear, align_corners=False, as torch's interpolate) cut into 4 crops
(TL, TR, BL, BR). Text: the LLM prompt with `<image>` expanded to the image tokens, and the text guide
(the question without `<image>`, CLIP-tokenised, cut to the text tower's context as the reference does).

Images of any mode become RGB as transformers' CLIP processor makes them (PIL's conversion, transparency
composited onto white), except 16-bit and 32-bit integer greyscale, which PIL would clip to white: those are
scaled to 8 bits (x 255/65535). EXIF orientation is not applied, as in the reference (LLaVA's
`Image.open(...).convert("RGB")`). Images over TGEDGE_MAX_IMAGE_PIXELS pixels are refused before decoding
(docs/ERRORS.md).
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tgedge.errors import TgedgeError, os_error
from tgedge.fileio import regular_file, special_file
from tgedge.prompt import BUILTIN_TEMPLATES, IMAGE_TOKEN, PromptTemplate, check_raw_prompt, split_question

# A raw prompt on a model with a text guide: refused here (run, the server) and by `tgedge client` before it sends.
RAW_NEEDS_GUIDE = ("--raw needs --guide TEXT for this model: the question its text guide sees (TG-LLaVA guides with "
                   "the question alone, not with the raw prompt)")

# The original LLaVA code marks image positions with this id where the vocabulary has no image token.
IMAGE_PLACEHOLDER_ID = -200
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS_ENV = "TGEDGE_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 2 * 89_478_485  # where PIL itself refuses an image as a decompression bomb (about 179 Mpx)
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's convert() would clip these to 255
RESAMPLE_FILTERS = (0, 1, 2, 3, 4, 5)  # PIL: nearest, lanczos, bilinear, bicubic, box, hamming


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass
class ImageSettings:
    """The subset of a CLIP image processor config that LLaVA uses."""
    shortest_edge: int | None = 224
    size_hw: tuple[int, int] | None = None  # used instead of shortest_edge when the config gives height/width
    crop_hw: tuple[int, int] = (224, 224)
    resample: int = 3  # PIL bicubic
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    def problems(self) -> list[str]:
        """Every wrong type or degenerate value (std 0 would divide by zero), for one message."""
        out = []
        if self.size_hw is None and not (_is_int(self.shortest_edge) and self.shortest_edge >= 1):
            out.append(f"size.shortest_edge must be an integer >= 1 (got {self.shortest_edge!r})")
        for key, hw in (("size", self.size_hw), ("crop_size", self.crop_hw)):
            if hw is not None and not (len(hw) == 2 and all(_is_int(v) and 1 <= v <= 8192 for v in hw)):
                out.append(f"{key} height and width must be integers in [1, 8192] (got {hw!r})")
        if self.resample not in RESAMPLE_FILTERS:
            out.append(f"resample must be a PIL filter id {RESAMPLE_FILTERS} (got {self.resample!r})")
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if not isinstance(getattr(self, key), bool):
                out.append(f"{key} must be true or false (got {getattr(self, key)!r})")
        if not (_is_number(self.rescale_factor) and self.rescale_factor > 0):
            out.append(f"rescale_factor must be a finite number > 0 (got {self.rescale_factor!r})")
        for key, values in (("image_mean", self.mean), ("image_std", self.std)):
            if len(values) != 3 or not all(_is_number(v) for v in values):
                out.append(f"{key} must be 3 finite numbers (got {list(values)!r})")
        if len(self.std) == 3 and all(_is_number(v) for v in self.std) and min(self.std) <= 0:
            out.append(f"image_std must be > 0 (got {list(self.std)!r}): a std of 0 divides by zero")
        return out

    def check(self, source) -> "ImageSettings":
        problems = self.problems()
        if problems:
            raise TgedgeError(f"{source}: {'; '.join(problems)}")
        return self

    @classmethod
    def from_processor_config(cls, d: dict, source="preprocessor_config.json") -> "ImageSettings":
        """A transformers image processor config (checked: types, ranges, std > 0)."""
        try:
            return cls._from_processor_config(d).check(source)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise TgedgeError(f"{source}: malformed image processor settings ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_processor_config(cls, d: dict) -> "ImageSettings":
        size, crop = d.get("size", {"shortest_edge": 224}), d.get("crop_size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(shortest_edge=size.get("shortest_edge"),
                   size_hw=(size["height"], size["width"]) if "height" in size else None,
                   crop_hw=(crop["height"], crop["width"]), resample=int(d.get("resample", 3)),
                   do_resize=d.get("do_resize", True), do_center_crop=d.get("do_center_crop", True),
                   do_rescale=d.get("do_rescale", True), rescale_factor=d.get("rescale_factor", 1 / 255),
                   do_normalize=d.get("do_normalize", True),
                   mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)), std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
                   do_convert_rgb=d.get("do_convert_rgb", True))

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSettings":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown image settings {sorted(unknown)}")
        d = dict(d)
        for k in ("size_hw", "crop_hw", "mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def max_image_pixels() -> int:
    """The largest image (width x height) tgedge decodes: TGEDGE_MAX_IMAGE_PIXELS, or PIL's own limit."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise TgedgeError(f"{MAX_PIXELS_ENV}={raw!r}: expected a whole number of pixels >= 1")
    return value


_pil_limit = threading.Lock()


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file; its size is checked against max_image_pixels() before any pixel is decoded."""
    limit = max_image_pixels()
    if isinstance(path, (str, os.PathLike)) and (kind := special_file(path)) is not None:
        raise TgedgeError(f"{path}: is {kind}, not an image")  # before opening: a FIFO would block
    try:
        with _pil_limit:  # tgedge's limit replaces PIL's, which only warns below 179 Mpx and refuses above
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with im:
            w, h = im.size
            if w * h > limit:
                raise TgedgeError(f"{path}: image is {w}x{h} ({w * h / 1e6:.0f} Mpx), over the limit of "
                                  f"{limit / 1e6:.0f} Mpx (raise it with {MAX_PIXELS_ENV}=PIXELS)")
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise TgedgeError(f"{path}: image not found") from None
    except IsADirectoryError:
        raise TgedgeError(f"{path}: is a directory, not an image") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError) as e:
        reason = str(e) if isinstance(path, (str, os.PathLike)) else str(e).replace(f" {path!r}", "")
        raise TgedgeError(f"{path}: unreadable image ({reason})") from None  # no object repr for in-memory bytes
    except OSError as e:
        if e.errno is not None:  # the file system's error (permission, loop...), not the decoder's
            raise os_error(e, path) from None
        raise TgedgeError(f"{path}: unreadable image ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' convert_to_rgb makes it (transparency onto white), 16-bit grey scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_GREY_MODES:
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise TgedgeError(f"image mode {image.mode} cannot be converted to RGB ({e})") from None


def pad_to_square(image: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    """LLaVA-1.5's expand2square with the background colour int(mean * 255)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    limit = max_image_pixels()
    if side * side > limit:  # checked before the square is allocated: a 1 x 60000 strip would need 3.6 Gpx
        raise TgedgeError(f"image is {w}x{h}; this model pads it to a square, {side}x{side} ({side * side / 1e6:.0f} "
                          f"Mpx), over the limit of {limit / 1e6:.0f} Mpx (raise it with {MAX_PIXELS_ENV}=PIXELS)")
    out = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def clip_pixels(image: Image.Image, s: ImageSettings) -> np.ndarray:
    """PIL image -> (3, H, W) float32, as transformers' CLIPImageProcessor (PIL backend) computes it."""
    image = to_rgb(image)  # whatever do_convert_rgb says: the tower takes 3 channels
    if s.do_resize:
        if s.size_hw is not None:
            h, w = s.size_hw
        else:
            w0, h0 = image.size
            short, long = (w0, h0) if w0 <= h0 else (h0, w0)
            new_short, new_long = s.shortest_edge, int(s.shortest_edge * long / short)
            w, h = (new_short, new_long) if w0 <= h0 else (new_long, new_short)
        image = image.resize((w, h), resample=s.resample)
    x = np.asarray(image).transpose(2, 0, 1)  # (3, H, W) uint8
    if s.do_center_crop:
        ch, cw = s.crop_hw
        h, w = x.shape[1:]
        if ch > h or cw > w:
            raise TgedgeError(f"image {w}x{h} is smaller than the crop {cw}x{ch} after resizing")
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[:, top:top + ch, left:left + cw]
    if s.do_rescale:
        x = (x.astype(np.float64) * s.rescale_factor).astype(np.float32)
    x = x.astype(np.float32)
    if s.do_normalize:
        mean, std = np.array(s.mean, np.float32), np.array(s.std, np.float32)
        x = ((x.T - mean) / std).T
    return np.ascontiguousarray(x, dtype=np.float32)


def upsample2x(x: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (C, 2H, 2W), bilinear with align_corners=False (torch.nn.functional.interpolate)."""
    def taps(n: int):
        src = np.maximum((np.arange(2 * n) + 0.5) / 2 - 0.5, 0.0)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        w1 = (src - i0).astype(np.float32)
        return i0, i1, 1 - w1, w1

    h0, h1, hw0, hw1 = taps(x.shape[1])
    c0, c1, cw0, cw1 = taps(x.shape[2])
    rows = x[:, h0] * hw0[None, :, None] + x[:, h1] * hw1[None, :, None]
    return (rows[:, :, c0] * cw0 + rows[:, :, c1] * cw1).astype(np.float32)


def detail_crops(pixels: np.ndarray) -> np.ndarray:
    """(3, H, W) normalised pixels -> (4, 3, H, W): the x2 view's TL, TR, BL, BR crops."""
    h, w = pixels.shape[1:]
    big = upsample2x(pixels)
    return np.stack([big[:, :h, :w], big[:, :h, w:], big[:, h:, :w], big[:, h:, w:]])




class Tokenizer:
    """A `tokenizer.json` through the tokenizers library; its own post-processor decides BOS/EOS."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer
        regular_file(path, "tokenizer file")
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except FileNotFoundError:
            raise TgedgeError(f"{path}: no tokenizer.json") from None
        except Exception as e:
            raise TgedgeError(f"{path}: cannot read tokenizer ({e})") from None
        self.path = Path(path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def vocabulary(self) -> dict[str, int]:
        return self._tok.get_vocab()


@dataclass
class PreprocessSpec:
    """Everything needed to turn (image, question) into model inputs; JSON-serialisable for the runtime."""
    image: ImageSettings
    template: PromptTemplate
    num_image_tokens: int
    image_token_id: int  # IMAGE_PLACEHOLDER_ID when the vocabulary has no image token
    pad_to_square: bool = False
    detail_crops: bool = False
    text_guide_length: int = 0  # 0: no text guide
    eos_token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["template"] = self.template.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, source="preprocess.json") -> "PreprocessSpec":
        """preprocess.json, checked: every wrong type or value in one message naming `source`."""
        if not isinstance(d, dict):
            raise TgedgeError(f"{source}: expected a JSON object")
        try:
            d = dict(d)
            d["image"] = ImageSettings.from_dict(d["image"])
            d["template"] = PromptTemplate.from_dict(d["template"])
            spec = cls(**d)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise TgedgeError(f"{source}: malformed ({type(e).__name__}: {e})") from None
        problems = [f"image.{p}" for p in spec.image.problems()] + spec.problems()
        if problems:
            raise TgedgeError(f"{source}: {'; '.join(problems)}")
        return spec

    def problems(self) -> list[str]:
        out = []
        t = self.template
        if t.jinja is None and t.name not in BUILTIN_TEMPLATES:
            out.append(f"template.name {t.name!r} is not a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
                       "and template.jinja is empty")
        if t.jinja is not None and not isinstance(t.jinja, str):
            out.append("template.jinja must be a string")
        if not (_is_int(self.num_image_tokens) and self.num_image_tokens >= 1):
            out.append(f"num_image_tokens must be an integer >= 1 (got {self.num_image_tokens!r})")
        if not _is_int(self.image_token_id):
            out.append(f"image_token_id must be an integer (got {self.image_token_id!r})")
        if not (_is_int(self.text_guide_length) and self.text_guide_length >= 0):
            out.append(f"text_guide_length must be an integer >= 0 (got {self.text_guide_length!r})")
        for key in ("pad_to_square", "detail_crops"):
            if not isinstance(getattr(self, key), bool):
                out.append(f"{key} must be true or false (got {getattr(self, key)!r})")
        if not (isinstance(self.eos_token_ids, list) and all(_is_int(i) and i >= 0 for i in self.eos_token_ids)):
            out.append(f"eos_token_ids must be a list of token ids >= 0 (got {self.eos_token_ids!r})")
        return out


@dataclass
class Inputs:
    """Model inputs for one prompt with N images (N = 1 but for a multi-image prompt; no pixels for a text-only
    one); the text carries a batch dim of 1, the pixels one row per image, in the order of the prompt's image
    places."""
    prompt: str
    input_ids: np.ndarray  # (1, T) int64, image positions hold `image_token_id`
    pixel_values: np.ndarray | None  # (N, 3, H, W) float32; None: a text-only prompt
    crops: np.ndarray | None = None  # (N, 4, 3, H, W) float32
    guide_ids: np.ndarray | None = None  # (1, Tg) int64


class Preprocessor:
    def __init__(self, spec: PreprocessSpec, tokenizer: Tokenizer, guide_tokenizer: Tokenizer | None = None):
        if spec.text_guide_length and guide_tokenizer is None:
            raise TgedgeError("this model has a text guide but no CLIP tokenizer was found")
        ids = {"EOS id": spec.eos_token_ids, "image token id": [spec.image_token_id]}
        beyond = [f"{what} {i}" for what, values in ids.items() for i in values if i >= tokenizer.vocab_size]
        if beyond:  # a tokenizer swapped for another model's (the text guide's CLIP one): answers would be empty
            raise TgedgeError(f"{tokenizer.path}: has {tokenizer.vocab_size} tokens, but this model's "
                              f"{', '.join(beyond)} lies beyond them: not this decoder's tokenizer")
        if guide_tokenizer is not None and tokenizer.vocabulary() == guide_tokenizer.vocabulary():
            raise TgedgeError(f"{tokenizer.path}: the same vocabulary as the text guide's CLIP tokenizer "
                              f"({guide_tokenizer.path}): the decoder needs its own tokenizer")
        self.spec, self.tokenizer, self.guide_tokenizer = spec, tokenizer, guide_tokenizer

    FILES = {"preprocess": "preprocess.json", "tokenizer": "tokenizer.json", "guide_tokenizer": "guide_tokenizer.json"}

    @classmethod
    def from_dir(cls, directory: str | Path, files: dict | None = None, source: str = "manifest.json") -> "Preprocessor":
        """Load preprocess.json, tokenizer.json and (with a text guide) guide_tokenizer.json from a folder.

        `files` (a manifest's `files` map) renames them; its names must stay inside the folder."""
        from tgedge.fileio import inside

        directory = Path(directory)

        def path(key: str) -> Path:
            if files is None or key not in files:
                return directory / cls.FILES[key]
            return inside(directory, files[key], f"{directory / source} files.{key}")

        spec_path = path("preprocess")
        regular_file(spec_path, "JSON file")
        try:
            raw = json.loads(spec_path.read_bytes())
        except FileNotFoundError:
            raise TgedgeError(f"{directory}: no {spec_path.name}") from None
        except OSError as e:
            raise os_error(e, spec_path) from None
        except ValueError as e:  # JSON or UTF-8
            raise TgedgeError(f"{spec_path}: not valid JSON ({e})") from None
        spec = PreprocessSpec.from_dict(raw, spec_path)
        guide = Tokenizer(path("guide_tokenizer")) if spec.text_guide_length else None
        return cls(spec, Tokenizer(path("tokenizer")), guide)

    def replace(self, **changes) -> "Preprocessor":
        """The same tokenizers with some spec fields changed (e.g. image tokens after an ablation)."""
        from dataclasses import replace

        return Preprocessor(replace(self.spec, **changes), self.tokenizer, self.guide_tokenizer)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        (directory / "preprocess.json").write_text(json.dumps(self.spec.to_dict(), indent=2) + "\n", encoding="utf-8")
        (directory / "tokenizer.json").write_bytes(self.tokenizer.path.read_bytes())
        if self.guide_tokenizer is not None:
            (directory / "guide_tokenizer.json").write_bytes(self.guide_tokenizer.path.read_bytes())

    # -- image ----------------------------------------------------------------------------------------------
    def pixels(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        s = self.spec
        if s.pad_to_square:
            image = pad_to_square(to_rgb(image), s.image.mean)
        px = clip_pixels(image, s.image)
        return px[None], (detail_crops(px)[None] if s.detail_crops else None)

    # -- text -----------------------------------------------------------------------------------------------
    def prompt(self, question: str, raw: bool = False, images: int = 1) -> str:
        if not isinstance(question, str) or not question.replace(IMAGE_TOKEN, "").strip():
            raise TgedgeError("empty prompt: ask a question about the image")
        return check_raw_prompt(question, images) if raw else self.spec.template.render(question, images)

    def input_ids(self, prompt: str, images: int = 1) -> np.ndarray:
        """Tokenise the prompt; each of its `images` `<image>`s becomes `num_image_tokens` image positions."""
        s = self.spec
        if prompt.count(IMAGE_TOKEN) != images:
            want = "exactly once" if images == 1 else f"{images} times, once per image"
            raise TgedgeError(f"prompt must contain {IMAGE_TOKEN} {want} (found {prompt.count(IMAGE_TOKEN)})")
        if s.image_token_id != IMAGE_PLACEHOLDER_ID and self.tokenizer.token_to_id(IMAGE_TOKEN) == s.image_token_id:
            ids = []
            for t in self.tokenizer.encode(prompt):
                ids += [t] * s.num_image_tokens if t == s.image_token_id else [t]
            if ids.count(s.image_token_id) != images * s.num_image_tokens:
                raise TgedgeError(f"the tokenizer reads {IMAGE_TOKEN} in this prompt other than {images} times")
        else:
            ids = self._chunked_ids(prompt)
        return np.array([ids], dtype=np.int64)

    def _chunked_ids(self, prompt: str) -> list[int]:
        """The original LLaVA's tokenizer_image_token: chunks tokenised apart, BOS kept once."""
        chunks = [self.tokenizer.encode(c) for c in prompt.split(IMAGE_TOKEN)]
        bos = self.tokenizer.encode("")[:1]  # what the tokenizer puts first on its own, if anything
        ids = chunks[0]
        for chunk in chunks[1:]:
            if bos and chunks[0][:1] == bos:
                chunk = chunk[1:]  # each chunk carries a BOS; keep the first only
            ids = ids + [self.spec.image_token_id] * self.spec.num_image_tokens + chunk
        return ids

    def guide_ids(self, question: str, images: int = 1) -> np.ndarray | None:
        """The text guide: the question without `<image>`, CLIP-tokenised, cut to the tower's context. With several
        images every image is guided by this same question."""
        if not self.spec.text_guide_length:
            return None
        ids = self.guide_tokenizer.encode(split_question(question, images))[: self.spec.text_guide_length]
        return np.array([ids], dtype=np.int64)

    def text(self, question: str, raw: bool = False) -> Inputs:
        """A text-only prompt (no image, no text guide: the decoder alone); `raw`: used verbatim."""
        if not isinstance(question, str) or not question.replace(IMAGE_TOKEN, "").strip():
            raise TgedgeError("empty prompt: ask a question")
        if IMAGE_TOKEN in question:
            raise TgedgeError(f"a text-only prompt must not contain {IMAGE_TOKEN} (it has no image to place)")
        prompt = question if raw else self.spec.template.render(question, images=0)
        return Inputs(prompt, np.array([self.tokenizer.encode(prompt)], dtype=np.int64), None)

    def __call__(self, image, question: str, raw: bool = False, guide: str | None = None) -> Inputs:
        """`image`: one image (a PIL image or a path) or a list of them, placed in order at the prompt's image
        places; None: a text-only prompt (`text`; `guide` unused). `raw`: `question` is the whole prompt, used
        verbatim (one `<image>` per image); the text guide then needs `guide` (the question alone: TG-LLaVA guides
        with the question, never with the chat template around it)."""
        if image is None:
            return self.text(question, raw)
        if raw and guide is None and self.spec.text_guide_length:
            raise TgedgeError(RAW_NEEDS_GUIDE)
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise TgedgeError("no image: give at least one")
        images = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        prompt = self.prompt(question, raw, len(images))
        views = [self.pixels(im) for im in images]
        pixel_values = np.concatenate([v[0] for v in views])
        crops = None if views[0][1] is None else np.concatenate([v[1] for v in views])
        guide_text = question if guide is None else guide
        return Inputs(prompt, self.input_ids(prompt, len(images)), pixel_values, crops,
                      self.guide_ids(guide_text, len(images) if guide is None else 1))
