"""Model configuration: one dataclass per component, and what every checkpoint layout reads the same way.

The layouts themselves (how a `config.json` is detected, checked and converted, and how its weights are renamed)
are `tgedge.layouts`' modules: `hf` (transformers LLaVA), `original` (the LLaVA / TG-LLaVA repository) and
`tgedge_layout` (tgedge's own). Here: the dataclasses, the schema machinery (kinds, per-section problems, the
consistency every layout shares) and the CLIP / decoder conversions."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tgedge.contract import family_of
from tgedge.errors import TgedgeError

HF_LAYOUT = "hf"
ORIGINAL_LAYOUT = "original"
TGEDGE_LAYOUT = "tgedge"

DECODER_FAMILIES = ("llama", "qwen2")

# CLIP defaults as transformers' CLIPVisionConfig / CLIPTextConfig define them.
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                             layer_norm_eps=1e-5, hidden_act="quick_gelu")
CLIP_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=8, max_position_embeddings=77, layer_norm_eps=1e-5,
                           hidden_act="quick_gelu", eos_token_id=49407)


@dataclass
class VisionConfig:
    """CLIP ViT vision tower; features from `select_layer` (an index into hidden states, -2 = penultimate)."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    select_layer: int = -2
    select_strategy: str = "default"  # "default" drops the class token, "full" keeps it
    num_patches: int = field(init=False)
    num_features: int = field(init=False)  # tokens per view after feature selection

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise TgedgeError(f"vision hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.select_strategy not in ("default", "full"):
            raise TgedgeError(f"unknown vision_feature_select_strategy {self.select_strategy!r} (expected default or full)")
        if not -self.num_layers - 1 <= self.select_layer <= self.num_layers:
            raise TgedgeError(f"the vision feature layer (vision_feature_layer, mm_vision_select_layer) "
                              f"{self.select_layer} is outside a {self.num_layers}-layer tower (expected "
                              f"{-self.num_layers - 1} to {self.num_layers})")
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_features = self.num_patches + (self.select_strategy == "full")

    @property
    def layers_needed(self) -> int:
        """How many encoder layers must run to produce hidden state `select_layer` (0 = embeddings)."""
        return self.select_layer % (self.num_layers + 1)


@dataclass
class TextGuideConfig:
    """CLIP text tower run over the user's question (the text guide)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407  # 2 means the legacy rule: pool at the largest token id, as transformers does


@dataclass
class FeatureMaskConfig:
    """TG-FOM: a BLIP-2 style Q-Former whose queries cross-attend to the pooled text guide."""
    num_queries: int  # one per vision patch
    hidden_size: int  # = vision width
    text_width: int
    num_layers: int = 2
    num_heads: int = 16
    intermediate_size: int = 0  # 0: 4 x hidden_size
    cross_attention_freq: int = 2
    layer_norm_eps: float = 1e-12  # BERT's

    def __post_init__(self):
        if not self.intermediate_size:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_heads:
            raise TgedgeError(f"TG-FOM hidden size {self.hidden_size} is not a multiple of {self.num_heads} heads")


@dataclass
class DetailPerceiverConfig:
    """TG-DP: an Idefics2-style perceiver resampler over the x2 crops, guided by the text tokens."""
    vision_width: int
    text_width: int
    llm_width: int
    num_positions: int  # 4 crops x patches per crop
    num_latents: int = 64
    depth: int = 2
    num_heads: int = 16
    head_dim: int = 96
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise TgedgeError(f"TG-DP num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


GATED_STRATEGIES = ("adaptive_gating", "attention_weights")


@dataclass
class GatedFusionConfig:
    """Gated cross-modal fusion (the Open-AutoGLM design): the main view's patch features cross-attend to the
    question's text tokens in `num_layers` pre-norm layers, and a gate mixes that text context into each patch."""
    vision_width: int
    text_width: int
    num_layers: int = 6
    num_heads: int = 16
    strategy: str = "adaptive_gating"  # or attention_weights (softmax modality weights)
    intermediate_size: int = 0  # 0: 4 x vision_width
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.strategy not in GATED_STRATEGIES:
            raise TgedgeError(f"unknown gated fusion strategy {self.strategy!r} "
                              f"(choose from {', '.join(GATED_STRATEGIES)})")
        if self.vision_width % self.num_heads:
            raise TgedgeError(f"gated fusion width {self.vision_width} is not a multiple of {self.num_heads} heads")
        if not self.intermediate_size:
            self.intermediate_size = 4 * self.vision_width


@dataclass
class ProjectorConfig:
    in_features: int
    out_features: int
    hidden_act: str = "gelu"
    bias: bool = True


@dataclass
class DecoderConfig:
    """LLaMA / Qwen2 decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention)."""
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int = 0
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # q/k/v (and o for llama) bias; Qwen2 has q/k/v bias only
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.family not in DECODER_FAMILIES:
            raise TgedgeError(f"unsupported decoder family {self.family!r} (supported: {', '.join(DECODER_FAMILIES)})")
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise TgedgeError(f"decoder num_attention_heads {self.num_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_kv_heads}")
        if self.hidden_act != "silu":
            raise TgedgeError(f"unsupported decoder hidden_act {self.hidden_act!r} (only silu)")

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.family == "llama" and self.attention_bias


@dataclass
class ModelConfig:
    layout: str
    vision: VisionConfig
    projector: ProjectorConfig
    decoder: DecoderConfig
    text_guide: TextGuideConfig | None = None
    feature_mask: FeatureMaskConfig | None = None
    detail_perceiver: DetailPerceiverConfig | None = None
    gated_fusion: GatedFusionConfig | None = None  # the `gated` family (never with TG-FOM / TG-DP)
    image_token_index: int | None = None  # None: the layout has no image token in its vocabulary
    image_token: str = "<image>"
    pad_to_square: bool = False  # LLaVA-1.5 `image_aspect_ratio: pad`
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    model_type: str = "llava"

    @property
    def has_tg(self) -> bool:
        """Text-guided: a text guide feeds the fusion (TG-FOM / TG-DP, or gated fusion); else plain LLaVA."""
        d = self.to_dict()
        return family_of(d).uses_text_guide(d)

    @property
    def num_image_tokens(self) -> int:
        """Decoder positions an image takes, as its fusion family says."""
        d = self.to_dict()
        return family_of(d).num_image_tokens(d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_config_json(path: Path) -> dict:
    """A JSON object from a checkpoint's file; every failure names the file."""
    from tgedge.errors import os_error
    from tgedge.fileio import regular_file

    regular_file(path, "JSON file")  # a FIFO would block the read below
    try:
        d = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        if Path(path).name == "config.json":
            raise TgedgeError(f"{path}: no config.json (is this a checkpoint directory?)") from None
        raise TgedgeError(f"{path}: not found") from None
    except OSError as e:
        raise os_error(e, path) from None
    except ValueError as e:  # JSON or UTF-8
        raise TgedgeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise TgedgeError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def bad_numbers(tree, where: str = "", max_abs: float | None = None) -> list[str]:
    """`key: value` for every number in a JSON/TOML tree that is NaN or infinite (or above `max_abs` in
    magnitude): policies, calibration ranges. An empty list when all are fine; booleans are not numbers."""
    out: list[str] = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        name = f"{where}.{key}" if where and isinstance(key, str) else f"{where}[{key}]" if where else str(key)
        if isinstance(value, (dict, list)):
            out += bad_numbers(value, name, max_abs)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value) or (max_abs is not None and abs(value) > max_abs):
                out.append(f"{name} {value!r}")
    return out


# -- config.json schema: types, ranges, finiteness and consistency, every problem in one message -----------------
# Kinds: "+int" integer >= 1, "0int" integer >= 0, "int", "+num" finite number > 0, "bool", "str", "dict",
# "id" token id >= 0, "ids" one id or a list of ids; a trailing "?" allows null (the loader's default then).
CLIP_VISION = {"hidden_size": "+int?", "intermediate_size": "+int?", "num_hidden_layers": "+int?",
               "num_attention_heads": "+int?", "image_size": "+int?", "patch_size": "+int?", "num_channels": "+int?",
               "layer_norm_eps": "+num?", "hidden_act": "str?"}
CLIP_TEXT = {"vocab_size": "+int?", "hidden_size": "+int?", "intermediate_size": "+int?",
             "num_hidden_layers": "+int?", "num_attention_heads": "+int?", "max_position_embeddings": "+int?",
             "layer_norm_eps": "+num?", "hidden_act": "str?", "eos_token_id": "id?"}
DECODER = {"vocab_size": "+int", "hidden_size": "+int", "intermediate_size": "+int", "num_hidden_layers": "+int",
           "num_attention_heads": "+int", "num_key_value_heads": "+int?", "head_dim": "+int?",
           "rms_norm_eps": "+num", "rope_theta": "+num?", "rope_scaling": "dict?", "max_position_embeddings": "+int",
           "attention_bias": "bool?", "tie_word_embeddings": "bool?", "hidden_act": "str", "bos_token_id": "id?",
           "eos_token_id": "ids?"}


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind_ok(v, kind: str) -> bool:
    if kind == "+int":
        return is_int(v) and v >= 1
    if kind in ("0int", "id"):
        return is_int(v) and v >= 0
    if kind == "int":
        return is_int(v)
    if kind == "+num":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if kind == "ids":
        return _kind_ok(v, "id") or (isinstance(v, list) and all(_kind_ok(x, "id") for x in v))
    return isinstance(v, {"bool": bool, "str": str, "dict": dict}[kind])


_KIND_TEXT = {"+int": "an integer >= 1", "0int": "an integer >= 0", "int": "an integer", "id": "a token id >= 0",
              "+num": "a finite number > 0", "ids": "a token id or a list of ids", "bool": "true or false",
              "str": "a string", "dict": "an object"}


def section_problems(d: dict, schema: dict, where: str) -> list[str]:
    out = []
    for key, kind in schema.items():
        if key not in d or (d[key] is None and kind.endswith("?")):
            continue
        if not _kind_ok(d[key], kind.rstrip("?")):
            out.append(f"{where}{key} must be {_KIND_TEXT[kind.rstrip('?')]} (got {d[key]!r})")
    return out


def value_or(d: dict, key: str, default):
    v = d.get(key)
    return default if v is None else v


def divides(out: list, where: str, width, heads, width_key="hidden_size", heads_key="num_attention_heads") -> None:
    if is_int(width) and is_int(heads) and heads >= 1 and width % heads:
        out.append(f"{where}{width_key} {width} is not a multiple of {heads_key} {heads}")


def consistency(vision: dict, decoder: dict, text: dict | None, top_ids: dict, where: dict) -> list[str]:
    """Heads dividing widths, token ids inside the vocabulary, patches fitting the image (a layout adds its
    fusion family's checks)."""
    out: list[str] = []
    v = {k: value_or(vision, k, CLIP_VISION_DEFAULTS[k]) for k in CLIP_VISION_DEFAULTS}
    divides(out, where["vision"], v["hidden_size"], v["num_attention_heads"])
    if is_int(v["patch_size"]) and is_int(v["image_size"]) and v["patch_size"] > v["image_size"]:
        out.append(f"{where['vision']}patch_size {v['patch_size']} is larger than image_size {v['image_size']}")
    if decoder.get("head_dim") is None:
        divides(out, where["decoder"], decoder.get("hidden_size"), decoder.get("num_attention_heads"))
    divides(out, where["decoder"], decoder.get("num_attention_heads"), decoder.get("num_key_value_heads"),
            "num_attention_heads", "num_key_value_heads")
    vocab = decoder.get("vocab_size")
    if is_int(vocab):
        for key, value in top_ids.items():
            ids = value if isinstance(value, list) else [value]
            bad = [i for i in ids if is_int(i) and i >= vocab]
            if bad:
                out.append(f"{key} {bad[0]} is outside the decoder's vocabulary (vocab_size {vocab})")
    if text is not None:
        t = {k: value_or(text, k, CLIP_TEXT_DEFAULTS[k]) for k in CLIP_TEXT_DEFAULTS}
        divides(out, where["text"], t["hidden_size"], t["num_attention_heads"])
        if is_int(t["eos_token_id"]) and is_int(t["vocab_size"]) and t["eos_token_id"] >= t["vocab_size"]:
            out.append(f"{where['text']}eos_token_id {t['eos_token_id']} is outside its vocabulary "
                       f"(vocab_size {t['vocab_size']})")
    return out


def _pick(d: dict, defaults: dict, key: str, *aliases: str) -> Any:
    for k in (key, *aliases):
        if d.get(k) is not None:
            return d[k]
    return defaults[key]


def vision_config_from_clip(d: dict, select_layer: int, select_strategy: str) -> VisionConfig:
    g = lambda k: _pick(d, CLIP_VISION_DEFAULTS, k)  # noqa: E731
    return VisionConfig(hidden_size=g("hidden_size"), intermediate_size=g("intermediate_size"),
                        num_layers=g("num_hidden_layers"), num_heads=g("num_attention_heads"),
                        image_size=g("image_size"), patch_size=g("patch_size"), num_channels=g("num_channels"),
                        layer_norm_eps=g("layer_norm_eps"), hidden_act=g("hidden_act"),
                        select_layer=select_layer, select_strategy=select_strategy)


def text_config_from_clip(d: dict) -> TextGuideConfig:
    g = lambda k: _pick(d, CLIP_TEXT_DEFAULTS, k)  # noqa: E731
    return TextGuideConfig(vocab_size=g("vocab_size"), hidden_size=g("hidden_size"),
                           intermediate_size=g("intermediate_size"), num_layers=g("num_hidden_layers"),
                           num_heads=g("num_attention_heads"), max_position_embeddings=g("max_position_embeddings"),
                           layer_norm_eps=g("layer_norm_eps"), hidden_act=g("hidden_act"),
                           eos_token_id=g("eos_token_id"))


def _rope(d: dict) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling from either transformers generation (`rope_parameters` is v5's)."""
    params = d.get("rope_parameters") or {}
    theta = float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = d.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise TgedgeError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
        scaling = None if kind == "default" else {**scaling, "rope_type": kind}
    return theta, scaling


def decoder_config_from(d: dict, family: str, tie_default: bool = False) -> DecoderConfig:
    theta, scaling = _rope(d)
    try:
        return DecoderConfig(
            family=family, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"], num_kv_heads=d.get("num_key_value_heads") or 0,
            head_dim=d.get("head_dim") or 0, rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=scaling, max_position_embeddings=d.get("max_position_embeddings", 2048),
            attention_bias=bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
            hidden_act=d.get("hidden_act", "silu"))
    except KeyError as e:
        raise TgedgeError(f"decoder config has no {e.args[0]!r}") from None


def eos_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, list) else [int(v)]
