"""Model configuration: one dataclass per component, read from a checkpoint's `config.json`.

Three checkpoint layouts are understood (see docs/CHECKPOINTS.md):
  a. Hugging Face transformers LLaVA (`model_type: llava`),
  b. the original LLaVA / TG-LLaVA repository (`model_type: llava_llama`, `llava_qwen`, ...; `mm_*` keys),
  c. tgedge's own: layout a plus a `tg` section describing the TG modules and the CLIP text tower.
Sizes that the TG-LLaVA reference code hard-codes (Q-Former heads, perceiver latents/heads) have the
reference's values as defaults and may be overridden by `tg_*` keys, which is how tiny test models are made.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    image_token_index: int | None = None  # None: the layout has no image token in its vocabulary
    image_token: str = "<image>"
    pad_to_square: bool = False  # LLaVA-1.5 `image_aspect_ratio: pad`
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    model_type: str = "llava"

    @property
    def has_tg(self) -> bool:
        return self.feature_mask is not None or self.detail_perceiver is not None

    @property
    def num_image_tokens(self) -> int:
        n = self.vision.num_features
        if self.detail_perceiver is not None:
            n += self.detail_perceiver.num_latents
        return n

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_config_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TgedgeError(f"{path}: no config.json (is this a checkpoint directory?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TgedgeError(f"{path}: not valid JSON ({e})") from None


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
    text = fom = dp = None
    if layout == TGEDGE_LAYOUT:
        tg = d["tg"]
        text = text_config_from_clip(tg.get("text_config") or {})
        fom, dp = tg_configs(tg, vision, text, decoder.hidden_size, bool(tg.get("feature_mask", True)),
                             bool(tg.get("detail_perceiver", True)))
        if fom is None and dp is None:
            text = None
    # `image_token_index: null` is tgedge's mark for a vocabulary without an image token (from layout b).
    image_token_index = d["image_token_index"] if "image_token_index" in d else 32000
    return ModelConfig(layout=layout, vision=vision, projector=projector, decoder=decoder, text_guide=text,
                       feature_mask=fom, detail_perceiver=dp, image_token_index=image_token_index,
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
