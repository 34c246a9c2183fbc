"""TG-LLaVA's `tg_*` config keys, as both the original layout (top level) and tgedge's (its `tg` section) write
them: sizes the TG-LLaVA reference code hard-codes (Q-Former layers and heads, perceiver latents and heads) have
the reference's values as defaults and may be overridden, which is how tiny test models are made."""

from __future__ import annotations

from tgedge.config import (CLIP_VISION_DEFAULTS, DetailPerceiverConfig, FeatureMaskConfig, TextGuideConfig,
                           VisionConfig, divides, value_or)
from tgedge.errors import TgedgeError

# kinds as tgedge.config's schemas spell them
KEYS = {"tg_fom_num_queries": "+int", "tg_fom_num_layers": "+int", "tg_fom_num_heads": "+int",
        "tg_fom_intermediate_size": "0int", "tg_dp_num_latents": "+int", "tg_dp_depth": "+int",
        "tg_dp_num_heads": "+int", "tg_dp_head_dim": "+int", "tg_dp_num_kv_heads": "+int",
        "tg_dp_rms_norm_eps": "+num"}


def problems(d: dict, vision: dict, where: str, with_mask: bool, with_perceiver: bool) -> list[str]:
    """Heads dividing widths: TG-FOM's over the vision width, TG-DP's query heads over its key/value heads."""
    out: list[str] = []
    if with_mask:
        divides(out, where, value_or(vision, "hidden_size", CLIP_VISION_DEFAULTS["hidden_size"]),
                value_or(d, "tg_fom_num_heads", 16), "vision hidden_size", "tg_fom_num_heads")
    if with_perceiver:
        divides(out, where, value_or(d, "tg_dp_num_heads", 16), value_or(d, "tg_dp_num_kv_heads", 4),
                "tg_dp_num_heads", "tg_dp_num_kv_heads")
    return out


def configs(d: dict, vision: VisionConfig, text: TextGuideConfig, llm_width: int,
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


def to_json(fom: FeatureMaskConfig | None, dp: DetailPerceiverConfig | None) -> dict:
    """The keys that give these configs back (what `configs` reads)."""
    out: dict = {}
    if fom is not None:
        out.update(tg_fom_num_layers=fom.num_layers, tg_fom_num_heads=fom.num_heads,
                   tg_fom_intermediate_size=fom.intermediate_size)
    if dp is not None:
        out.update(tg_dp_num_latents=dp.num_latents, tg_dp_depth=dp.depth, tg_dp_num_heads=dp.num_heads,
                   tg_dp_head_dim=dp.head_dim, tg_dp_num_kv_heads=dp.num_kv_heads, tg_dp_rms_norm_eps=dp.rms_norm_eps)
    return out
