"""TG-LLaVA's fusion family (`tg`): F' = F + Z(M_t) (TG-FOM), the projector, then TG-DP's latents.

A fusion family builds its modules onto the model (under the checkpoint's names: `text_tower`, `mm_cross_attn`,
`mm_patch_encoder`) and fuses the stage contract's named fusion inputs into image embeddings. Its inputs are
declared in `tgedge.contract` (the family's registry entry).
"""

from __future__ import annotations

import torch

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
