"""CLIP transformer blocks shared by the vision tower and the text guide encoder.

Attribute names follow transformers' CLIP modules so that checkpoints load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from tgedge.model.common import MultiHeadAttention, activation


CLIP_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj")


class CLIPAttention(MultiHeadAttention):
    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, dim, num_heads, CLIP_NAMES)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, None, mask)


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, dim: int, hidden: int, num_heads: int, eps: float, act: str):
        super().__init__()
        self.self_attn = CLIPAttention(dim, num_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, num_layers: int, dim: int, hidden: int, num_heads: int, eps: float, act: str):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(dim, hidden, num_heads, eps, act) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, num_layers: int | None = None):
        for layer in self.layers[:num_layers]:
            x = layer(x, mask)
        return x
