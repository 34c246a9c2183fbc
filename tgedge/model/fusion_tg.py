"""TG-LLaVA's fusion family (`tg`): F' = F + Z(M_t) (TG-FOM), the projector, then TG-DP's latents.

A fusion family builds its modules onto the model (under the checkpoint's names: `text_tower`, `mm_cross_attn`,
`mm_patch_encoder`) and fuses the stage contract's named fusion inputs into image embeddings. Its inputs are
declared in `tgedge.contract` (the family's registry entry).
"""

from __future__ import annotations

import dataclasses

import torch

from tgedge.errors import TgedgeError

from tgedge.model.fom import FeatureOptimizationMask
from tgedge.model.perceiver import DetailPerceiver
from tgedge.model.text import TextGuideEncoder


class TGFusion:
    @staticmethod
    def build(model, cfg) -> None:
        model.text_tower = TextGuideEncoder(cfg.text_guide)
        model.mm_cross_attn = FeatureOptimizationMask(cfg.feature_mask) if cfg.feature_mask else None
        model.mm_patch_encoder = DetailPerceiver(cfg.detail_perceiver) if cfg.detail_perceiver else None

    @staticmethod
    def fuse(model, image_features, crop_features=None, text_features=None, text_pooled=None) -> torch.Tensor:
        """Main view (B, N, Dv) [+ crops (B, 4N, Dv), text tokens (B, T, Dt), pooled text (B, Dt)] -> (B, N[+L], D)."""
        if model.mm_cross_attn is not None:
            image_features = image_features + model.mm_cross_attn(text_pooled)  # F' = F + Z(M_t)
        embeds = model.multi_modal_projector(image_features)
        if model.mm_patch_encoder is not None:
            embeds = torch.cat([embeds, model.mm_patch_encoder(crop_features, text_features)], dim=1)
        return embeds

    @staticmethod
    @torch.no_grad()
    def ablate(model, which: str) -> None:
        """`fom` zeroes TG-FOM's zero_layer (F' = F), `dp` drops TG-DP's tokens (the config follows), `both`."""
        if which in ("fom", "both"):
            if getattr(model, "mm_cross_attn", None) is None:
                raise TgedgeError("this model has no TG-FOM to ablate")
            model.mm_cross_attn.zero_layer.weight.zero_()
            model.mm_cross_attn.zero_layer.bias.zero_()
        if which in ("dp", "both"):
            if getattr(model, "mm_patch_encoder", None) is None:
                raise TgedgeError("this model has no TG-DP to ablate")
            without_tg(model, feature_mask=False, detail_perceiver=True)


def without_tg(model, feature_mask: bool = True, detail_perceiver: bool = True):
    """Drop TG modules in place (the ablations): the model then runs as plain LLaVA for what was dropped."""
    cfg = model.cfg
    if feature_mask:
        model.mm_cross_attn, cfg = None, dataclasses.replace(cfg, feature_mask=None)
    if detail_perceiver:
        model.mm_patch_encoder, cfg = None, dataclasses.replace(cfg, detail_perceiver=None)
    model.cfg = cfg
    return model


def feature_mask(model) -> FeatureOptimizationMask | None:
    """The model's TG-FOM module, for code outside the family (e.g. a test checkpoint's non-zero zero_layer)."""
    return getattr(model, "mm_cross_attn", None)
