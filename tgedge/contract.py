"""The stage contract: which stages a model runs, their named tensors, the symbolic dims and the KV cache.

Declared once here, torch-free, from the model config alone (the dict `ModelConfig.to_dict()` gives, which is
what `manifest.json` stores), and read by every layer: the model's stage methods, export specs, the runtime
`Pipeline`, the reference pipeline, validate, quantize, inspect, build and its TensorRT profiles.

    contract = StageContract.from_config(model_cfg, max_context=2048)
    contract.stage_names            # ('text_guide', 'vision', 'fusion', 'embed', 'decoder')
    contract.stages["fusion"].inputs
    contract.cache.past_names()     # ['past_key_values.0.key', ...]

Fusion families (how image features and the question meet before the decoder) are registered by name:
`tg` (TG-FOM + TG-DP, TG-LLaVA), `gated` (cross-attention fusion layers with an adaptive gate, the Open-AutoGLM
design) and `plain` (LLaVA's projector alone). A family is one model file (its torch
module, imported only when a model is built) plus one `FusionFamily` entry below (or `register_family` elsewhere):
what the stages, the preprocessing (`preprocess_needs`), the ablations and the CLI's choices are follows from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tgedge.errors import TgedgeError

# Symbolic dims, named as optimum and onnxruntime-genai name them.
BATCH, VIEWS, GUIDE = "batch_size", "num_views", "guide_sequence_length"
SEQ, PAST, TOTAL = "sequence_length", "past_sequence_length", "total_sequence_length"

# Every stage any family can have, in pipeline order (a family without a text guide skips `text_guide`).
ALL_STAGES = ("text_guide", "vision", "fusion", "embed", "decoder")


@dataclass(frozen=True)
class TensorMeta:
    """A graph input or output: numpy dtype name and a shape whose symbolic dims are names."""
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.dtype} ({dims}{',' if len(self.shape) == 1 else ''})"

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorMeta":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


# -- fusion families --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusionFamily:
    """How a family shapes the stages around fusion; every function takes the model config dict."""
    name: str
    model: str  # "module:Class" of its torch implementation (tgedge.model), imported when a model is built
    detects: Callable[[dict], bool]  # does this config describe a model of this family?
    uses_text_guide: Callable[[dict], bool]
    views: Callable[[dict], int]  # vision views per image (the main view, plus crops)
    fusion_inputs: Callable[[dict], list[TensorMeta]]
    num_image_tokens: Callable[[dict], int]
    # inference ablations its model class's `ablate(model, which)` knows (`tgedge eval --ablate`)
    ablations: tuple[str, ...] = ()
    # stages whose outputs depend on the image alone, never on the question: what `tgedge.stagecache` may keep
    question_independent: tuple[str, ...] = ("vision",)


def _features(cfg: dict) -> int:
    return cfg["vision"]["num_features"]


def _tg_inputs(cfg: dict) -> list[TensorMeta]:
    n, dv = _features(cfg), cfg["vision"]["hidden_size"]
    inputs = [TensorMeta("image_features", "float32", (BATCH, n, dv))]
    if cfg.get("detail_perceiver"):
        inputs += [TensorMeta("crop_features", "float32", (BATCH, 4 * n, dv)),
                   TensorMeta("text_features", "float32", (BATCH, GUIDE, cfg["text_guide"]["hidden_size"]))]
    if cfg.get("feature_mask"):
        inputs.append(TensorMeta("text_pooled", "float32", (BATCH, cfg["text_guide"]["hidden_size"])))
    return inputs


TG = FusionFamily(
    "tg", "tgedge.model.fusion_tg:TGFusion",
    detects=lambda cfg: bool(cfg.get("feature_mask") or cfg.get("detail_perceiver")),
    uses_text_guide=lambda cfg: True,
    views=lambda cfg: 5 if cfg.get("detail_perceiver") else 1,
    fusion_inputs=_tg_inputs,
    num_image_tokens=lambda cfg: _features(cfg) + (cfg["detail_perceiver"]["num_latents"]
                                                   if cfg.get("detail_perceiver") else 0),
    ablations=("fom", "dp", "both"),  # TG-FOM's zero_layer zeroed, TG-DP's tokens dropped, both
    question_independent=("vision",))  # the text guide steers TG-FOM and TG-DP: fusion depends on the question


def _gated_inputs(cfg: dict) -> list[TensorMeta]:
    """Main view patches and the question's text tokens (unpadded, batch 1, as TG-DP gets them)."""
    return [TensorMeta("image_features", "float32", (BATCH, _features(cfg), cfg["vision"]["hidden_size"])),
            TensorMeta("text_features", "float32", (BATCH, GUIDE, cfg["text_guide"]["hidden_size"]))]


GATED = FusionFamily(
    "gated", "tgedge.model.fusion_gated:GatedFusion",
    detects=lambda cfg: bool(cfg.get("gated_fusion")),
    uses_text_guide=lambda cfg: True,
    views=lambda cfg: 1,
    fusion_inputs=_gated_inputs,
    num_image_tokens=_features,  # one token per patch
    ablations=("gate", "text"),  # g = 0 (image only), no text context
    question_independent=("vision",))  # its fusion layers cross-attend to the question's tokens

PLAIN = FusionFamily(
    "plain", "tgedge.model.fusion_plain:PlainFusion",
    detects=lambda cfg: True,
    uses_text_guide=lambda cfg: False,
    views=lambda cfg: 1,
    fusion_inputs=lambda cfg: [TensorMeta("image_features", "float32",
                                          (BATCH, _features(cfg), cfg["vision"]["hidden_size"]))],
    num_image_tokens=_features,
    question_independent=("vision", "fusion"))  # the projector sees the image alone: the image embeddings too

# Detection order: the first family whose `detects` holds (plain last: it takes any LLaVA).
FAMILIES: dict[str, FusionFamily] = {f.name: f for f in (TG, GATED, PLAIN)}


def family_of(cfg: dict) -> FusionFamily:
    return next(f for f in FAMILIES.values() if f.detects(cfg))


def register_family(family: FusionFamily, before: str = "plain") -> None:
    """Add a family to `FAMILIES` ahead of `before` in detection order (in place: every reader sees it)."""
    if family.name in FAMILIES:
        raise TgedgeError(f"fusion family {family.name!r} is already registered")
    items = list(FAMILIES.items())
    at = [name for name, _ in items].index(before)
    FAMILIES.clear()
    FAMILIES.update(items[:at] + [(family.name, family)] + items[at:])


def ablation_choices() -> list[str]:
    """Every registered family's ablations, in registry order (the CLI's `--ablate` choices)."""
    return [a for f in FAMILIES.values() for a in f.ablations]


def preprocess_needs(cfg: dict) -> dict:
    """What a model's family asks of preprocessing: `PreprocessSpec`'s image tokens, detail crops and text guide
    length. Views past the main one are `preprocess.detail_crops`' four quadrants of the x2 view."""
    family = family_of(cfg)
    guide = family.uses_text_guide(cfg)
    return {"num_image_tokens": family.num_image_tokens(cfg), "detail_crops": family.views(cfg) > 1,
            "text_guide_length": cfg["text_guide"]["max_position_embeddings"] if guide else 0}


# -- the KV cache -----------------------------------------------------------------------------------------------
# growing: present = past + new, returned each step (the graph concatenates; any backend runs it).
# static: one buffer per layer at the export's max context, bound as both past and present and written in place at the
# step's positions (onnxruntime's GroupQueryAttention; onnxruntime-genai's past_present_share_buffer).
# static-onnx: the same buffers and runtime contract in standard ONNX ops (opset 24): TensorScatter writes them in place
# (TensorRT's KVCacheUpdate layer) and Attention attends (TensorRT's attention layer): the static cache for TensorRT.
CACHE_MODES = ("growing", "static", "static-onnx")
# What `tgedge export --target` writes for each backend family: the cache it decodes fastest with that its parser takes.
# onnxruntime (CPU/CUDA; the default): static, the fastest decode here and the one the serving scheduler batches;
# tensorrt (10.15+ / TensorRT for RTX): static-onnx, its KVCacheUpdate and attention layers, batched too;
# jetpack6 (TensorRT 10.3, which predates opset 24): growing, opset-17 ops every backend runs.
TARGETS = {"onnxruntime": "static", "tensorrt": "static-onnx", "jetpack6": "growing"}
DEFAULT_TARGET = "onnxruntime"


@dataclass(frozen=True)
class CacheLayout:
    """The decoder's KV cache: tensor names, shape, dtype, mode, and its TensorRT optimisation profiles.

    Profiles are listed in TensorRT's order: profile i of a decoder engine is `profiles[i]`."""
    mode: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    past_key: str = "past_key_values.{}.key"
    past_value: str = "past_key_values.{}.value"
    present_key: str = "present.{}.key"
    present_value: str = "present.{}.value"
    profiles: tuple[dict, ...] = ()  # ({"name": "prefill", "dims": {dim: [min, opt, max]}}, {"name": "decode", ..})
    max_length: int = 0  # static: the buffers' length (the export's max context)
    # static: the decoder takes each row's filled length from its attention mask's sum, so one call decodes rows of
    # different lengths (a batched cache's slots). GroupQueryAttention always did; static-onnx exports since then do
    row_lengths: bool = False

    @property
    def shares_buffer(self) -> bool:
        """Past and present are one buffer (static, static-onnx), not past in and past + new out (growing)."""
        return self.mode != "growing"

    def past_names(self) -> list[str]:
        return [p.format(i) for i in range(self.num_layers) for p in (self.past_key, self.past_value)]

    def present_names(self) -> list[str]:
        return [p.format(i) for i in range(self.num_layers) for p in (self.present_key, self.present_value)]

    def present_for(self) -> dict[str, str]:
        """past name -> the present output that becomes it at the next step."""
        return dict(zip(self.past_names(), self.present_names()))

    @property
    def past_shape(self) -> tuple[int | str, ...]:
        return (BATCH, self.num_kv_heads, self.max_length if self.shares_buffer else PAST, self.head_dim)

    @property
    def present_shape(self) -> tuple[int | str, ...]:
        return (BATCH, self.num_kv_heads, self.max_length if self.shares_buffer else TOTAL, self.head_dim)

    def profile_index(self, past_len: int) -> int:
        """The optimisation profile a decoder call runs under: prefill (nothing cached) or decode."""
        return 0 if past_len == 0 else 1

    def profile_for(self, feed: dict) -> int:
        """`profile_index` of a decoder feed: the positions cached before it are the attention mask's length less
        the step's (a static cache's past inputs are its whole buffers, whatever is filled)."""
        return self.profile_index(feed["attention_mask"].shape[1] - feed["inputs_embeds"].shape[1])

    def to_dict(self) -> dict:
        return {"mode": self.mode, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "dtype": self.dtype, "past_key_names": self.past_key.replace("{}", "%d"),
                "past_value_names": self.past_value.replace("{}", "%d"),
                "present_key_names": self.present_key.replace("{}", "%d"),
                "present_value_names": self.present_value.replace("{}", "%d"),
                "past_present_share_buffer": self.shares_buffer, "profiles": list(self.profiles),
                **({"max_length": self.max_length, "row_lengths": self.row_lengths} if self.shares_buffer else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "CacheLayout":
        if d.get("mode") not in CACHE_MODES:
            raise TgedgeError(f"kv_cache mode {d.get('mode')!r} is not one this tgedge runs "
                              f"({', '.join(CACHE_MODES)})")
        fmt = lambda key: str(d[key]).replace("%d", "{}")  # noqa: E731
        return cls(d["mode"], int(d["num_layers"]), int(d["num_kv_heads"]), int(d["head_dim"]), d.get("dtype", "float32"),
                   fmt("past_key_names"), fmt("past_value_names"), fmt("present_key_names"),
                   fmt("present_value_names"), tuple(d.get("profiles", ())), int(d.get("max_length", 0)),
                   bool(d.get("row_lengths", d["mode"] == "static")))  # an earlier static-onnx: one length for all


# -- the contract -----------------------------------------------------------------------------------------------
def profile_dims(cfg: dict, max_context: int, max_batch: int = 1) -> dict[str, dict[str, int]]:
    """min/opt/max of every symbolic dim: TensorRT's optimisation profiles and the memory estimates."""
    family = family_of(cfg)
    views = family.views(cfg)
    guide = cfg["text_guide"]["max_position_embeddings"] if cfg.get("text_guide") else 1
    opt_seq = min(family.num_image_tokens(cfg) + 32, max_context)
    return {BATCH: {"min": 1, "opt": 1, "max": max_batch},
            VIEWS: {"min": 1, "opt": views, "max": views * max_batch},
            GUIDE: {"min": 1, "opt": min(16, guide), "max": guide},
            SEQ: {"min": 1, "opt": opt_seq, "max": max_context},
            PAST: {"min": 0, "opt": opt_seq, "max": max_context - 1},
            TOTAL: {"min": 1, "opt": opt_seq + 1, "max": max_context}}


def decoder_profiles(dims: dict[str, dict[str, int]]) -> tuple[dict, ...]:
    """Prefill (nothing cached) and decode (one token) profiles: TensorRT checks a profile's shapes together, and
    `total = past + sequence` cannot hold at both maxima in one."""
    mmo = {k: [v["min"], v["opt"], v["max"]] for k, v in dims.items()}
    seq, past = mmo[SEQ], mmo[PAST]
    first = max(past[0], 1)
    prefill = {**mmo, PAST: [0, 0, 0], TOTAL: list(seq)}
    decode = {**mmo, SEQ: [1, 1, 1], PAST: [first, past[1], past[2]], TOTAL: [first + 1, past[1] + 1, past[2] + 1]}
    return ({"name": "prefill", "dims": prefill}, {"name": "decode", "dims": decode})


@dataclass
class StageContract:
    family: str
    stages: dict[str, Stage]  # in pipeline order
    dims: dict[str, dict[str, int]]
    cache: CacheLayout
    max_context: int

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(self.stages)

    def has(self, stage: str) -> bool:
        return stage in self.stages

    @property
    def fusion_family(self) -> FusionFamily:
        return FAMILIES[self.family]

    def stage_profiles(self, stage: str) -> list[dict[str, tuple[int, int, int]]]:
        """Symbolic dim -> (min, opt, max) per TensorRT optimisation profile of a stage's graph."""
        if stage == "decoder":
            return [{k: tuple(v) for k, v in p["dims"].items()} for p in self.cache.profiles]
        return [{k: (v["min"], v["opt"], v["max"]) for k, v in self.dims.items()}]

    @classmethod
    def from_config(cls, cfg: dict, max_context: int, cache_mode: str = "growing",
                    dims: dict[str, dict[str, int]] | None = None, cache_dtype: str = "float32",
                    row_lengths: bool | None = None) -> "StageContract":
        """The contract of a model config (`ModelConfig.to_dict()`), exported for `max_context` positions;
        `dims` (min/opt/max per symbolic dim) and `row_lengths` (`CacheLayout`'s) as recorded in a manifest, else
        derived (what an export writes now)."""
        family = family_of(cfg)
        dec, vis = cfg["decoder"], cfg["vision"]
        stages: list[Stage] = []
        if family.uses_text_guide(cfg):
            text = cfg["text_guide"]
            stages.append(Stage("text_guide", (TensorMeta("input_ids", "int64", (BATCH, GUIDE)),),
                                (TensorMeta("text_features", "float32", (BATCH, GUIDE, text["hidden_size"])),
                                 TensorMeta("text_pooled", "float32", (BATCH, text["hidden_size"])))))
        pixels = (VIEWS, vis["num_channels"], vis["image_size"], vis["image_size"])
        stages.append(Stage("vision", (TensorMeta("pixel_values", "float32", pixels),),
                            (TensorMeta("image_features", "float32", (VIEWS, vis["num_features"], vis["hidden_size"])),)))
        stages.append(Stage("fusion", tuple(family.fusion_inputs(cfg)),
                            (TensorMeta("image_embeds", "float32",
                                        (BATCH, family.num_image_tokens(cfg), dec["hidden_size"])),)))
        stages.append(Stage("embed", (TensorMeta("input_ids", "int64", (BATCH, SEQ)),),
                            (TensorMeta("inputs_embeds", "float32", (BATCH, SEQ, dec["hidden_size"])),)))
        dims = dims or profile_dims(cfg, max_context)
        if cache_mode not in CACHE_MODES:
            raise TgedgeError(f"unknown KV cache mode {cache_mode!r} (choose from {', '.join(CACHE_MODES)})")
        cache = CacheLayout(cache_mode, dec["num_layers"], dec["num_kv_heads"], dec["head_dim"], cache_dtype,
                            profiles=decoder_profiles(dims), max_length=max_context if cache_mode != "growing" else 0,
                            row_lengths=cache_mode != "growing" if row_lengths is None else row_lengths)
        # a static cache's positions are its slots: the graph derives them from the attention mask's length
        positions = () if cache.shares_buffer else (TensorMeta("position_ids", "int64", (BATCH, SEQ)),)
        stages.append(Stage(
            "decoder",
            (TensorMeta("inputs_embeds", "float32", (BATCH, SEQ, dec["hidden_size"])),
             TensorMeta("attention_mask", "int64", (BATCH, TOTAL)))
            + positions
            + tuple(TensorMeta(n, cache.dtype, cache.past_shape) for n in cache.past_names()),
            # logits of the last position only: what generation needs (validate teacher-forces step by step)
            (TensorMeta("logits", "float32", (BATCH, 1, dec["vocab_size"])),)
            + tuple(TensorMeta(n, cache.dtype, cache.present_shape) for n in cache.present_names())))
        return cls(family.name, {s.name: s for s in stages}, dims, cache, max_context)

    def to_dict(self) -> dict:
        """What manifest.json records besides each graph's inputs/outputs (which are the stages' tensors)."""
        return {"fusion_family": self.family, "stages": list(self.stages), "kv_cache": self.cache.to_dict()}
