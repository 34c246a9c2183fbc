"""TG-DP, the text-guided detail perceiver, as the TG-LLaVA reference builds it.

The x2 image's 4 crops go through the vision tower: (B, 4N, Dv) + a learned position embedding, then
`pre_mlp`. An Idefics2-style perceiver resampler (latents, grouped-query attention whose keys and values
come from concat[context, latents], pre-RMSNorm, SwiGLU 4x, final RMSNorm) attends in its first layer to
the text guide's token features (after `resize_linear`) and in every later layer to the crop tokens.
`proj` maps the latents to the LLM width; they follow the image tokens in the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgedge.config import DetailPerceiverConfig
from tgedge.model.common import RMSNorm, attention, merge_heads, split_heads


class PerceiverAttention(nn.Module):
    def __init__(self, cfg: DetailPerceiverConfig):
        super().__init__()
        d, h, kv, hd = cfg.vision_width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads = h, kv
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        kv_in = torch.cat([context, latents], dim=1)  # (B, T + L, D)
        q = split_heads(self.q_proj(latents), self.num_heads)
        k = split_heads(self.k_proj(kv_in), self.num_kv_heads)
        v = split_heads(self.v_proj(kv_in), self.num_kv_heads)
        return self.o_proj(merge_heads(attention(q, k, v)))


class PerceiverMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PerceiverLayer(nn.Module):
    def __init__(self, cfg: DetailPerceiverConfig):
        super().__init__()
        d, eps = cfg.vision_width, cfg.rms_norm_eps
        self.input_latents_norm = RMSNorm(d, eps)
        self.input_context_norm = RMSNorm(d, eps)
        self.self_attn = PerceiverAttention(cfg)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = PerceiverMLP(d, 4 * d)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context))
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: DetailPerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, cfg.vision_width) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.vision_width, cfg.rms_norm_eps)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = self.latents.expand(image.shape[0], -1, -1)  # (B, L, D)
        for i, layer in enumerate(self.layers):
            x = layer(x, text if i == 0 else image)
        return self.norm(x)


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class DetailPerceiver(nn.Module):
    def __init__(self, cfg: DetailPerceiverConfig):
        super().__init__()
        self.cfg = cfg
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.vision_width)
        self.pre_mlp = _mlp(cfg.vision_width, cfg.vision_width)
        self.proj = _mlp(cfg.vision_width, cfg.llm_width)
        self.perceiver = PerceiverResampler(cfg)
        self.resize_linear = nn.Linear(cfg.text_width, cfg.vision_width)

    def forward(self, crop_features: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """crop features (B, 4N, Dv), text tokens (B, T, Dt) -> detail tokens (B, L, D_llm)."""
        image = self.pre_mlp(crop_features + self.position_embedding.weight)
        return self.proj(self.perceiver(image, self.resize_linear(text_tokens)))
