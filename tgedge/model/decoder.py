"""LLaMA / Qwen2 decoder with a preallocated KV cache (gpt-fast style).

One `forward(x, input_pos)` serves prefill (T tokens) and decode (1 token). Without `setup_cache` it
runs plain causal attention over `x` alone (training, and the full-recompute reference in tests).
Attribute names follow transformers' LLaMA so that checkpoints load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tgedge.config import DecoderConfig
from tgedge.model.common import RMSNorm, attention, merge_heads, split_heads


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # x (B, H, T, D); cos, sin (T, D)


class KVCache(nn.Module):
    def __init__(self, batch: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype=torch.float32,
                 device=None):
        super().__init__()
        shape = (batch, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at `input_pos` (T,); return the whole caches (B, Hkv, S, D)."""
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads = h, kv
        self.q_proj = nn.Linear(d, h * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=cfg.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos, cache=None):
        """`cache` (anything with `update(input_pos, k, v)`) overrides the module's own preallocated one."""
        q = apply_rope(split_heads(self.q_proj(x), self.num_heads), cos, sin)  # (B, H, T, D)
        k = apply_rope(split_heads(self.k_proj(x), self.num_kv_heads), cos, sin)  # (B, Hkv, T, D)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        cache = cache if cache is not None else self.kv_cache
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, Hkv, S, D)
        return self.o_proj(merge_heads(attention(q, k, v, mask)))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.max_seq_len = 0

    def setup_cache(self, batch: int, max_seq_len: int) -> None:
        """Preallocate the KV cache; forward() then writes at `input_pos` and attends over the cache."""
        self.max_seq_len = max_seq_len
        weight = self.embed_tokens.weight  # the cache lives where the weights do, in their dtype
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch, self.cfg.num_kv_heads, max_seq_len, self.cfg.head_dim,
                                               weight.dtype, weight.device)

    def clear_cache(self) -> None:
        self.max_seq_len = 0
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., T) -> cos, sin (..., T, D)."""
        freqs = positions.float()[..., None] * self.inv_freq  # (..., T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) embeddings at positions input_pos (T,) -> hidden states (B, T, D)."""
        cos, sin = self.rope(input_pos, x.dtype)  # (T, D)
        keys = torch.arange(self.max_seq_len, device=x.device) if self.max_seq_len else input_pos
        mask = torch.where(keys[None, :] <= input_pos[:, None], 0.0, torch.finfo(x.dtype).min).to(x.dtype)  # (T, S)
        return self.run_layers(x, cos, sin, mask, input_pos)

    def run_layers(self, x, cos, sin, mask, input_pos, caches=None) -> torch.Tensor:
        """`caches`: one per layer, in place of the layers' own (the exported decoder graph's past/present); given
        fewer caches than layers, the first len(caches) layers run (export's check of a decoder too big to hold)."""
        for i, layer in enumerate(self.layers if caches is None else self.layers[:len(caches)]):
            x = layer(x, cos, sin, mask, input_pos, None if caches is None else caches[i])
        return self.norm(x)
