"""CLIP text tower over the user's question: the text guide for TG-FOM (pooled) and TG-DP (tokens)."""

from __future__ import annotations

import torch
from torch import nn

from tgedge.config import TextGuideConfig
from tgedge.model.clip import CLIPEncoder


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextGuideConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class TextGuideEncoder(nn.Module):
    def __init__(self, cfg: TextGuideConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                                   cfg.layer_norm_eps, cfg.hidden_act)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) -> token features (B, T, D), pooled (B, D).

        The padding mask is `ids != 0`, as the TG-LLaVA reference builds it; attention is causal as in CLIP.
        """
        t = ids.shape[1]
        neg = torch.finfo(torch.float32).min
        causal = torch.full((t, t), neg).triu(1)  # (T, T)
        padding = torch.where(ids != 0, 0.0, neg)[:, None, None, :]  # (B, 1, 1, T)
        x = self.encoder(self.embeddings(ids), mask=causal + padding)
        x = self.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0]), self.pool_index(ids)]
        return x, pooled

    def pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Where CLIP pools: the first EOS token; with the legacy eos_token_id 2, the largest id (EOT)."""
        if self.cfg.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.cfg.eos_token_id).int().argmax(dim=-1)
