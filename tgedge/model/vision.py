"""CLIP ViT vision tower: features from the selected layer, class token dropped for `default`."""

from __future__ import annotations

import torch
from torch import nn

from tgedge.config import VisionConfig
from tgedge.model.clip import CLIPEncoder


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, N+1, D)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, as CLIP names it
        self.encoder = CLIPEncoder(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                                   cfg.layer_norm_eps, cfg.hidden_act)
        # Kept so that checkpoints load strictly; LLaVA never uses the pooled output.
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(V, C, H, W) views -> (V, num_features, D): hidden state `select_layer`, CLS dropped for `default`."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x = self.encoder(x, num_layers=self.cfg.layers_needed)
        return x[:, 1:] if self.cfg.select_strategy == "default" else x
