"""Model configuration: one dataclass per component, read from a checkpoint's `config.json`.

Three checkpoint layouts are understood (see docs/CHECKPOINTS.md):
  a. Hugging Face transformers LLaVA (`model_type: llava`),
  b. the original LLaVA / TG-LLaVA repository (`model_type: llava_llama`, `llava_qwen`, ...; `mm_*` keys),
  c. tgedge's own: layout a plus a `tg` section describing the text-guided modules and the CLIP text tower
     (TG-FOM / TG-DP, or, under `tg.tg_fusion`, the gated cross-modal fusion family).
Sizes that the TG-LLaVA reference code hard-codes (Q-Former heads, perceiver latents/heads) have the
reference's values as defaults and may be overridden by `tg_*` keys, which is how tiny test models are made.
"""

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

ORIGINAL_MODEL_TYPES = {
    "llava_llama": "llama",
    "llava_qwen": "qwen2",
    "llava_qwen2": "qwen2",
    "llava_llama_text_learnable_query": "llama",
    "llava_qwen_text_learnable_query": "qwen2",
}
TG_MODEL_TYPES = {"llava_llama_text_learnable_query", "llava_qwen_text_learnable_query"}
DECODER_FAMILIES = ("llama", "qwen2")

# CLIP defaults as transformers' CLIPVisionConfig / CLIPTextConfig define them.
_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                             layer_norm_eps=1e-5, hidden_act="quick_gelu")
_CLIP_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
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
            raise TgedgeError(f"vision feature layer {self.select_layer} is outside a {self.num_layers}-layer tower")
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
_CLIP_VISION = {"hidden_size": "+int?", "intermediate_size": "+int?", "num_hidden_layers": "+int?",
                "num_attention_heads": "+int?", "image_size": "+int?", "patch_size": "+int?", "num_channels": "+int?",
                "layer_norm_eps": "+num?", "hidden_act": "str?"}
_CLIP_TEXT = {"vocab_size": "+int?", "hidden_size": "+int?", "intermediate_size": "+int?",
              "num_hidden_layers": "+int?", "num_attention_heads": "+int?", "max_position_embeddings": "+int?",
              "layer_norm_eps": "+num?", "hidden_act": "str?", "eos_token_id": "id?"}
_DECODER = {"vocab_size": "+int", "hidden_size": "+int", "intermediate_size": "+int", "num_hidden_layers": "+int",
            "num_attention_heads": "+int", "num_key_value_heads": "+int?", "head_dim": "+int?",
            "rms_norm_eps": "+num", "rope_theta": "+num?", "rope_scaling": "dict?", "max_position_embeddings": "+int",
            "attention_bias": "bool?", "tie_word_embeddings": "bool?", "hidden_act": "str", "bos_token_id": "id?",
            "eos_token_id": "ids?"}
_TG = {"feature_mask": "bool", "detail_perceiver": "bool", "tg_fom_num_queries": "+int", "tg_fom_num_layers": "+int",
       "tg_fom_num_heads": "+int", "tg_fom_intermediate_size": "0int", "tg_dp_num_latents": "+int",
       "tg_dp_depth": "+int", "tg_dp_num_heads": "+int", "tg_dp_head_dim": "+int", "tg_dp_num_kv_heads": "+int",
       "tg_dp_rms_norm_eps": "+num", "text_config": "dict?", "tg_fusion": "dict?"}
# tg.tg_fusion (layout c): the gated cross-modal fusion family's settings.
_GATED = {"family": "str", "layers": "+int", "heads": "+int", "strategy": "str", "intermediate_size": "0int",
          "layer_norm_eps": "+num"}
_HF_TOP = {"image_token_index": "id?", "vision_feature_select_strategy": "str", "projector_hidden_act": "str",
           "multimodal_projector_bias": "bool", "tie_word_embeddings": "bool", "image_aspect_ratio": "str?",
           "vision_config": "dict?", "text_config": "dict", "tg": "dict"}
_ORIGINAL_TOP = {**_DECODER, **{k: v for k, v in _TG.items() if k.startswith("tg_")},
                 "mm_vision_select_layer": "int", "mm_hidden_size": "+int", "mm_projector_type": "str",
                 "mm_vision_select_feature": "str", "mm_patch_merge_type": "str", "image_aspect_ratio": "str?"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind_ok(v, kind: str) -> bool:
    if kind == "+int":
        return _is_int(v) and v >= 1
    if kind in ("0int", "id"):
        return _is_int(v) and v >= 0
    if kind == "int":
        return _is_int(v)
    if kind == "+num":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if kind == "ids":
        return _kind_ok(v, "id") or (isinstance(v, list) and all(_kind_ok(x, "id") for x in v))
    return isinstance(v, {"bool": bool, "str": str, "dict": dict}[kind])


_KIND_TEXT = {"+int": "an integer >= 1", "0int": "an integer >= 0", "int": "an integer", "id": "a token id >= 0",
              "+num": "a finite number > 0", "ids": "a token id or a list of ids", "bool": "true or false",
              "str": "a string", "dict": "an object"}


def _section_problems(d: dict, schema: dict, where: str) -> list[str]:
    out = []
    for key, kind in schema.items():
        if key not in d or (d[key] is None and kind.endswith("?")):
            continue
        if not _kind_ok(d[key], kind.rstrip("?")):
            out.append(f"{where}{key} must be {_KIND_TEXT[kind.rstrip('?')]} (got {d[key]!r})")
    return out


def _get(d: dict, key: str, default):
    v = d.get(key)
    return default if v is None else v


def _divides(out: list, where: str, width, heads, width_key="hidden_size", heads_key="num_attention_heads") -> None:
    if _is_int(width) and _is_int(heads) and heads >= 1 and width % heads:
        out.append(f"{where}{width_key} {width} is not a multiple of {heads_key} {heads}")


def _consistency(vision: dict, decoder: dict, text: dict | None, tg: dict, top_ids: dict, where: dict) -> list[str]:
    """Heads dividing widths, token ids inside the vocabulary, patches fitting the image."""
    out: list[str] = []
    v = {k: _get(vision, k, _CLIP_VISION_DEFAULTS[k]) for k in _CLIP_VISION_DEFAULTS}
    _divides(out, where["vision"], v["hidden_size"], v["num_attention_heads"])
    if _is_int(v["patch_size"]) and _is_int(v["image_size"]) and v["patch_size"] > v["image_size"]:
        out.append(f"{where['vision']}patch_size {v['patch_size']} is larger than image_size {v['image_size']}")
    if decoder.get("head_dim") is None:
        _divides(out, where["decoder"], decoder.get("hidden_size"), decoder.get("num_attention_heads"))
    _divides(out, where["decoder"], decoder.get("num_attention_heads"), decoder.get("num_key_value_heads"),
             "num_attention_heads", "num_key_value_heads")
    vocab = decoder.get("vocab_size")
    if _is_int(vocab):
        for key, value in top_ids.items():
            ids = value if isinstance(value, list) else [value]
            bad = [i for i in ids if _is_int(i) and i >= vocab]
            if bad:
                out.append(f"{key} {bad[0]} is outside the decoder's vocabulary (vocab_size {vocab})")
    if text is not None:
        t = {k: _get(text, k, _CLIP_TEXT_DEFAULTS[k]) for k in _CLIP_TEXT_DEFAULTS}
        _divides(out, where["text"], t["hidden_size"], t["num_attention_heads"])
        if _is_int(t["eos_token_id"]) and _is_int(t["vocab_size"]) and t["eos_token_id"] >= t["vocab_size"]:
            out.append(f"{where['text']}eos_token_id {t['eos_token_id']} is outside its vocabulary "
                       f"(vocab_size {t['vocab_size']})")
        if tg.get("feature_mask", _tg_default(tg)):
            _divides(out, where["tg"], v["hidden_size"], _get(tg, "tg_fom_num_heads", 16), "vision hidden_size",
                     "tg_fom_num_heads")
        if tg.get("detail_perceiver", _tg_default(tg)):
            _divides(out, where["tg"], _get(tg, "tg_dp_num_heads", 16), _get(tg, "tg_dp_num_kv_heads", 4),
                     "tg_dp_num_heads", "tg_dp_num_kv_heads")
    return out


def _tg_default(tg: dict) -> bool:
    """Whether TG-FOM / TG-DP exist when `tg` does not say: yes, unless the section configures gated fusion."""
    return not isinstance(tg.get("tg_fusion"), dict)


def _fusion_problems(tg: dict, vision: dict) -> list[str]:
    """tg.tg_fusion: known keys of the right kinds, family gated, a known strategy, heads dividing the width,
    and not beside TG-FOM / TG-DP (a model has one fusion family)."""
    f = tg.get("tg_fusion")
    if not isinstance(f, dict):
        return []  # absent, null, or a wrong type that the `tg` section's schema names
    out = _section_problems(f, _GATED, "tg.tg_fusion.")
    unknown = sorted(set(f) - set(_GATED))
    if unknown:
        out.append(f"tg.tg_fusion has unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(_GATED)})")
    family = f.get("family")
    if family is None:
        out.append('tg.tg_fusion.family is missing (the fusion family it configures: "gated")')
    elif isinstance(family, str) and family != "gated":
        out.append(f"tg.tg_fusion.family {family!r} is not one tg_fusion configures (gated; the tg family is "
                   "tg.feature_mask / tg.detail_perceiver)")
    strategy = f.get("strategy")
    if isinstance(strategy, str) and strategy not in GATED_STRATEGIES:
        out.append(f"tg.tg_fusion.strategy {strategy!r} is unknown (choose from {', '.join(GATED_STRATEGIES)})")
    for key in ("feature_mask", "detail_perceiver"):
        if tg.get(key) is True:
            out.append(f"tg.{key} is true beside tg.tg_fusion (gated): a model has one fusion family")
    width, heads = _get(vision, "hidden_size", _CLIP_VISION_DEFAULTS["hidden_size"]), _get(f, "heads", 16)
    if _is_int(width) and _is_int(heads) and heads >= 1 and width % heads:
        out.append(f"tg.tg_fusion.heads {heads} does not divide the vision hidden_size {width}")
    return out


def check_config_json(d: dict, path, clip: dict | None = None, clip_path=None) -> None:
    """Refuse a config.json (and, for the original layout, the CLIP config) with any wrong type, non-finite or
    out-of-range value or inconsistency, listing every problem in one message."""
    layout = detect_layout(d, path)
    if layout == ORIGINAL_LAYOUT:
        clip = clip if isinstance(clip, dict) else {}
        problems = _section_problems(d, _ORIGINAL_TOP, "")
        vision, text = clip.get("vision_config") or {}, clip.get("text_config") or {}
        for section, schema, name in ((vision, _CLIP_VISION, "vision_config"), (text, _CLIP_TEXT, "text_config")):
            if not isinstance(section, dict):
                problems.append(f"{clip_path}: {name} must be an object")
            else:
                problems += [f"{clip_path}: {p}" for p in _section_problems(section, schema, f"{name}.")]
        if not problems:
            where = {"vision": f"{clip_path}: vision_config.", "decoder": "", "text": f"{clip_path}: text_config.",
                     "tg": ""}
            problems = _consistency(vision, d, text, d, {k: d.get(k) for k in ("bos_token_id", "eos_token_id")
                                                            if d.get(k) is not None}, where)
    else:
        problems = _section_problems(d, _HF_TOP, "")
        vision, decoder, tg = d.get("vision_config") or {}, d.get("text_config") or {}, d.get("tg") or {}
        text = tg.get("text_config") or {} if isinstance(tg, dict) else {}
        for section, schema, name in ((vision, _CLIP_VISION, "vision_config."), (decoder, _DECODER, "text_config."),
                                      (tg, _TG, "tg."), (text, _CLIP_TEXT, "tg.text_config.")):
            if isinstance(section, dict):
                problems += _section_problems(section, schema, name)
        if isinstance(tg, dict) and isinstance(vision, dict):
            problems += _fusion_problems(tg, vision)
        if "text_config" in d and isinstance(decoder, dict):
            problems += [f"text_config.{k} is missing" for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                  "num_hidden_layers", "num_attention_heads")
                         if k not in decoder]
        if not problems:
            ids = {f"text_config.{k}": decoder[k] for k in ("bos_token_id", "eos_token_id")
                   if decoder.get(k) is not None}
            if d.get("image_token_index") is not None:
                ids["image_token_index"] = d["image_token_index"]
            elif "image_token_index" not in d:
                ids["image_token_index"] = 32000  # the default hf_model_config assumes
            where = {"vision": "vision_config.", "decoder": "text_config.", "text": "tg.text_config.", "tg": "tg."}
            problems = _consistency(vision, decoder, text if "tg" in d else None, tg, ids, where)
    if problems:
        raise TgedgeError(f"{path}: {'; '.join(problems)}")


def _pick(d: dict, defaults: dict, key: str, *aliases: str) -> Any:
    for k in (key, *aliases):
        if d.get(k) is not None:
            return d[k]
    return defaults[key]


def vision_config_from_clip(d: dict, select_layer: int, select_strategy: str) -> VisionConfig:
    g = lambda k: _pick(d, _CLIP_VISION_DEFAULTS, k)  # noqa: E731
    return VisionConfig(hidden_size=g("hidden_size"), intermediate_size=g("intermediate_size"),
                        num_layers=g("num_hidden_layers"), num_heads=g("num_attention_heads"),
                        image_size=g("image_size"), patch_size=g("patch_size"), num_channels=g("num_channels"),
                        layer_norm_eps=g("layer_norm_eps"), hidden_act=g("hidden_act"),
                        select_layer=select_layer, select_strategy=select_strategy)


def text_config_from_clip(d: dict) -> TextGuideConfig:
    g = lambda k: _pick(d, _CLIP_TEXT_DEFAULTS, k)  # noqa: E731
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


def _eos_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, list) else [int(v)]


def tg_configs(d: dict, vision: VisionConfig, text: TextGuideConfig, llm_width: int,
               with_mask: bool, with_perceiver: bool):
    """TG-FOM / TG-DP configs: sizes derived as the reference code derives them, `tg_*` keys override."""
    fom = dp = None
    if with_mask:
        fom = FeatureMaskConfig(
            num_queries=d.get("tg_fom_num_queries", vision.num_patches), hidden_size=vision.hidden_size,
            text_width=text.hidden_size, num_layers=d.get("tg_fom_num_layers", 2),
            num_heads=d.get("tg_fom_num_heads", 16), intermediate_size=d.get("tg_fom_intermediate_size", 0))
        if fom.num_queries != vision.num_patches:
            raise TgedgeError(f"TG-FOM has {fom.num_queries} queries but the vision tower gives "
                              f"{vision.num_patches} patches")
    if with_perceiver:
        dp = DetailPerceiverConfig(
            vision_width=vision.hidden_size, text_width=text.hidden_size, llm_width=llm_width,
            num_positions=4 * vision.num_patches, num_latents=d.get("tg_dp_num_latents", 64),
            depth=d.get("tg_dp_depth", 2), num_heads=d.get("tg_dp_num_heads", 16),
            head_dim=d.get("tg_dp_head_dim", 96), num_kv_heads=d.get("tg_dp_num_kv_heads", 4),
            rms_norm_eps=d.get("tg_dp_rms_norm_eps", 1e-5))
    return fom, dp


def gated_config(d: dict | None, vision: VisionConfig, text: TextGuideConfig) -> GatedFusionConfig | None:
    """tg.tg_fusion (checked by check_config_json) -> the gated fusion config; None when absent."""
    if d is None:
        return None
    return GatedFusionConfig(vision_width=vision.hidden_size, text_width=text.hidden_size,
                             num_layers=d.get("layers", 6), num_heads=d.get("heads", 16),
                             strategy=d.get("strategy", "adaptive_gating"),
                             intermediate_size=d.get("intermediate_size", 0),
                             layer_norm_eps=d.get("layer_norm_eps", 1e-5))


def gated_config_json(g: GatedFusionConfig) -> dict:
    """The gated fusion config as tg.tg_fusion (what gated_config reads back)."""
    return {"family": "gated", "layers": g.num_layers, "heads": g.num_heads, "strategy": g.strategy,
            "intermediate_size": g.intermediate_size, "layer_norm_eps": g.layer_norm_eps}


def detect_layout(d: dict, path: Path) -> str:
    model_type = d.get("model_type")
    if model_type == "llava":
        return TGEDGE_LAYOUT if "tg" in d else HF_LAYOUT
    if model_type in ORIGINAL_MODEL_TYPES:
        return ORIGINAL_LAYOUT
    known = ", ".join(["llava", *ORIGINAL_MODEL_TYPES])
    raise TgedgeError(f"{path}: unknown model_type {model_type!r} (supported: {known})")


def hf_model_config(d: dict, layout: str) -> ModelConfig:
    """Layouts a and c. For c, `d['tg']` holds the text tower config and which TG modules exist."""
    text_d = d.get("text_config") or {}
    family = text_d.get("model_type", "llama")
    if family not in DECODER_FAMILIES:
        raise TgedgeError(f"unsupported text_config.model_type {family!r} (supported: {', '.join(DECODER_FAMILIES)})")
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise TgedgeError(f"vision_feature_layer {layer!r}: only a single layer index is supported")
    vision = vision_config_from_clip(d.get("vision_config") or {}, layer,
                                     d.get("vision_feature_select_strategy", "default"))
    decoder = decoder_config_from(text_d, family, tie_default=bool(d.get("tie_word_embeddings", False)))
    projector = ProjectorConfig(vision.hidden_size, decoder.hidden_size, d.get("projector_hidden_act", "gelu"),
                                bool(d.get("multimodal_projector_bias", True)))
    text = fom = dp = gated = None
    if layout == TGEDGE_LAYOUT:
        tg = d["tg"]
        text = text_config_from_clip(tg.get("text_config") or {})
        gated = gated_config(tg.get("tg_fusion"), vision, text)
        fom, dp = tg_configs(tg, vision, text, decoder.hidden_size, bool(tg.get("feature_mask", gated is None)),
                             bool(tg.get("detail_perceiver", gated is None)))
        if fom is None and dp is None and gated is None:
            text = None
    # `image_token_index: null` is tgedge's mark for a vocabulary without an image token (from layout b).
    image_token_index = d["image_token_index"] if "image_token_index" in d else 32000
    return ModelConfig(layout=layout, vision=vision, projector=projector, decoder=decoder, text_guide=text,
                       feature_mask=fom, detail_perceiver=dp, gated_fusion=gated, image_token_index=image_token_index,
                       pad_to_square=d.get("image_aspect_ratio") == "pad",
                       bos_token_id=text_d.get("bos_token_id"),
                       eos_token_id=_eos_list(text_d.get("eos_token_id")), model_type="llava")


def original_model_config(d: dict, clip: dict, with_mask: bool, with_perceiver: bool) -> ModelConfig:
    """Layout b. `clip` is the CLIPModel config.json (vision_config and text_config) from `--clip DIR`."""
    model_type = d["model_type"]
    family = ORIGINAL_MODEL_TYPES[model_type]
    projector_type = d.get("mm_projector_type", "linear")
    if projector_type != "mlp2x_gelu":
        raise TgedgeError(f"unsupported mm_projector_type {projector_type!r} (only mlp2x_gelu)")
    select = d.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise TgedgeError(f"unknown mm_vision_select_feature {select!r}")
    merge = d.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise TgedgeError(f"unsupported mm_patch_merge_type {merge!r} (only flat)")
    vision = vision_config_from_clip(clip.get("vision_config") or {}, d.get("mm_vision_select_layer", -2),
                                     "default" if select == "patch" else "full")
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise TgedgeError(f"mm_hidden_size {d['mm_hidden_size']} does not match the CLIP vision width "
                          f"{vision.hidden_size}")
    decoder = decoder_config_from(d, family)
    projector = ProjectorConfig(vision.hidden_size, decoder.hidden_size, "gelu", True)
    text = fom = dp = None
    if with_mask or with_perceiver:
        text = text_config_from_clip(clip.get("text_config") or {})
        fom, dp = tg_configs(d, vision, text, decoder.hidden_size, with_mask, with_perceiver)
    return ModelConfig(layout=ORIGINAL_LAYOUT, vision=vision, projector=projector, decoder=decoder,
                       text_guide=text, feature_mask=fom, detail_perceiver=dp, image_token_index=None,
                       pad_to_square=d.get("image_aspect_ratio", "square") == "pad",
                       bos_token_id=d.get("bos_token_id"), eos_token_id=_eos_list(d.get("eos_token_id")),
                       model_type=model_type)
