"""LLaVA's fusion family (`plain`): the projector over the main view's features, nothing text-guided."""

from __future__ import annotations

import torch

from tgedge.model.text import TextGuideEncoder


class PlainFusion:
    @staticmethod
    def build(model, cfg) -> None:
        model.text_tower = TextGuideEncoder(cfg.text_guide) if cfg.text_guide else None

    @staticmethod
    def fuse(model, image_features) -> torch.Tensor:
        """(B, N, Dv) -> (B, N, D)."""
        return model.multi_modal_projector(image_features)
