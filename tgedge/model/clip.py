"""CLIP transformer blocks shared by the vision tower and the text guide encoder.

Attribute names follow transformers' CLIP modules so that checkpoints load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from tgedge.model.common import activation, attention, merge_heads, split_heads


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.num_heads
        q, k, v = (split_heads(p(x), h) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(attention(q, k, v, mask)))


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
