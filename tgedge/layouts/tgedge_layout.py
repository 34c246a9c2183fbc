"""tgedge's own layout: the Hugging Face LLaVA layout plus a `tg` section naming the fusion family's modules and
the CLIP text tower (`tg.text_config`): TG-FOM / TG-DP (`tg.feature_mask`, `tg.detail_perceiver`, `tg_*` sizes)
or, under `tg.tg_fusion`, gated cross-modal fusion; the text guide's tokenizer in `text_guide/`. It is what
`tgedge.checkpoint.save_checkpoint` writes (`config_json`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tgedge.config import (CLIP_TEXT, CLIP_VISION_DEFAULTS, GATED_STRATEGIES, TGEDGE_LAYOUT, GatedFusionConfig,
                           ModelConfig, TextGuideConfig, VisionConfig, consistency, is_int, section_problems,
                           text_config_from_clip, value_or)
from tgedge.errors import TgedgeError
import tgedge.layouts.hf as hf
import tgedge.layouts.tg_keys as tg_keys
from tgedge.layouts.common import Parts

NAME = TGEDGE_LAYOUT
MODEL_TYPES = ("llava",)

SECTION = {"feature_mask": "bool", "detail_perceiver": "bool", **tg_keys.KEYS, "text_config": "dict?",
           "tg_fusion": "dict?"}
GATED = {"family": "str", "layers": "+int", "heads": "+int", "strategy": "str", "intermediate_size": "0int",
         "layer_norm_eps": "+num"}  # tg.tg_fusion: the gated cross-modal fusion family's settings


def detects(raw: dict) -> bool:
    return raw.get("model_type") == "llava" and "tg" in raw


# -- config.json checks -----------------------------------------------------------------------------------------
def _tg_default(tg: dict) -> bool:
    """Whether TG-FOM / TG-DP exist when `tg` does not say: yes, unless the section configures gated fusion."""
    return not isinstance(tg.get("tg_fusion"), dict)


def _fusion_problems(tg: dict, vision: dict) -> list[str]:
    """tg.tg_fusion: known keys of the right kinds, family gated, a known strategy, heads dividing the width,
    and not beside TG-FOM / TG-DP (a model has one fusion family)."""
    f = tg.get("tg_fusion")
    if not isinstance(f, dict):
        return []  # absent, null, or a wrong type that the `tg` section's schema names
    out = section_problems(f, GATED, "tg.tg_fusion.")
    unknown = sorted(set(f) - set(GATED))
    if unknown:
        out.append(f"tg.tg_fusion has unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(GATED)})")
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
    width, heads = value_or(vision, "hidden_size", CLIP_VISION_DEFAULTS["hidden_size"]), value_or(f, "heads", 16)
    if is_int(width) and is_int(heads) and heads >= 1 and width % heads:
        out.append(f"tg.tg_fusion.heads {heads} does not divide the vision hidden_size {width}")
    return out


def check(d: dict, path: Path) -> None:
    """hf.check's problems and those of the `tg` section, every one in one message."""
    problems = hf.schema_problems(d)
    vision, tg = d.get("vision_config") or {}, d.get("tg") or {}
    text = tg.get("text_config") or {} if isinstance(tg, dict) else {}
    for section, schema, name in ((tg, SECTION, "tg."), (text, CLIP_TEXT, "tg.text_config.")):
        if isinstance(section, dict):
            problems += section_problems(section, schema, name)
    if isinstance(tg, dict) and isinstance(vision, dict):
        problems += _fusion_problems(tg, vision)
    problems += hf.missing_decoder_keys(d)
    if not problems:
        problems = consistency(vision, d.get("text_config") or {}, text, hf.token_ids(d), hf.WHERE)
        problems += tg_keys.problems(tg, vision, hf.WHERE["tg"], tg.get("feature_mask", _tg_default(tg)),
                                     tg.get("detail_perceiver", _tg_default(tg)))
    if problems:
        raise TgedgeError(f"{path}: {'; '.join(problems)}")


# -- conversion -------------------------------------------------------------------------------------------------
def gated_config(d: dict | None, vision: VisionConfig, text: TextGuideConfig) -> GatedFusionConfig | None:
    """tg.tg_fusion (checked by `check`) -> the gated fusion config; None when absent."""
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


def model_config(d: dict) -> ModelConfig:
    """The HF layout's config plus what `tg` holds: the text tower config and which fusion modules exist."""
    cfg = dataclasses.replace(hf.model_config(d), layout=NAME)
    tg = d["tg"]
    text = text_config_from_clip(tg.get("text_config") or {})
    gated = gated_config(tg.get("tg_fusion"), cfg.vision, text)
    fom, dp = tg_keys.configs(tg, cfg.vision, text, cfg.decoder.hidden_size,
                              bool(tg.get("feature_mask", gated is None)), bool(tg.get("detail_perceiver", gated is None)))
    if fom is None and dp is None and gated is None:
        text = None
    return dataclasses.replace(cfg, text_guide=text, feature_mask=fom, detail_perceiver=dp, gated_fusion=gated)


def config_json(cfg: ModelConfig) -> dict:
    """A model config as this layout's config.json (what `model_config` reads back)."""
    v, d = cfg.vision, cfg.decoder
    text_config = {"model_type": d.family, "vocab_size": d.vocab_size, "hidden_size": d.hidden_size,
                   "intermediate_size": d.intermediate_size, "num_hidden_layers": d.num_layers,
                   "num_attention_heads": d.num_heads, "num_key_value_heads": d.num_kv_heads, "head_dim": d.head_dim,
                   "rms_norm_eps": d.rms_norm_eps, "rope_theta": d.rope_theta, "rope_scaling": d.rope_scaling,
                   "max_position_embeddings": d.max_position_embeddings, "attention_bias": d.attention_bias,
                   "tie_word_embeddings": d.tie_word_embeddings, "hidden_act": d.hidden_act,
                   "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id or None}
    out = {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": cfg.image_token_index,  # null: no image token in the vocabulary (original layout)
        "vision_feature_layer": v.select_layer, "vision_feature_select_strategy": v.select_strategy,
        "projector_hidden_act": cfg.projector.hidden_act, "multimodal_projector_bias": cfg.projector.bias,
        "tie_word_embeddings": d.tie_word_embeddings,
        "image_aspect_ratio": "pad" if cfg.pad_to_square else "square",
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                          "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
                          "hidden_act": v.hidden_act},
        "text_config": text_config,
    }
    if cfg.has_tg:
        t, fom, dp = cfg.text_guide, cfg.feature_mask, cfg.detail_perceiver
        tg = {"feature_mask": fom is not None, "detail_perceiver": dp is not None,
              "text_config": {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                              "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                              "num_attention_heads": t.num_heads, "max_position_embeddings": t.max_position_embeddings,
                              "layer_norm_eps": t.layer_norm_eps, "hidden_act": t.hidden_act,
                              "eos_token_id": t.eos_token_id}}
        tg.update(tg_keys.to_json(fom, dp))
        if cfg.gated_fusion is not None:
            tg["tg_fusion"] = gated_config_json(cfg.gated_fusion)
        out["tg"] = tg
    return out


# -- reading ----------------------------------------------------------------------------------------------------
def read(path: Path, raw: dict, clip: Path | None = None) -> Parts:
    check(raw, path / "config.json")
    return hf.read_checked(path, raw, model_config, guide_tokenizer=path / "text_guide" / "tokenizer.json")
