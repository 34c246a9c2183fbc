"""TG-FOM, the text-guided feature optimisation mask, as the TG-LLaVA reference builds it.

pooled text -> `resize_linear` -> one text token; N learnable query tokens (one per vision patch) go
through a BLIP-2 style Q-Former (BERT layers, post-LayerNorm) that cross-attends to that token in every
`cross_attention_freq`-th layer (layer 0 only for 2 layers). The queries pass through the embedding
LayerNorm first and use the `intermediate_query` / `output_query` FFN weights. `zero_layer`, initialised
to zero, maps the mask M_t to the term added to the vision features: F' = F + Z(M_t).

Attribute names (`Qformer.bert.encoder.layer`, ...) follow the reference so that its weights load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from tgedge.config import FeatureMaskConfig
from tgedge.model.common import MultiHeadAttention, activation


class BertSelfAttention(MultiHeadAttention):
    """BERT's query/key/value; its output projection is BertOutput's. The reference's masks are all ones: no mask."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__(dim, kv_dim, num_heads, ("query", "key", "value", None))


class BertOutput(nn.Module):
    """dense -> residual add -> LayerNorm (BERT's post-norm)."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(dim, kv_dim, num_heads)
        self.output = BertOutput(dim, dim, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, context), x)


class BertIntermediate(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation("gelu")(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: FeatureMaskConfig, has_cross_attention: bool):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = BertAttention(d, d, cfg.num_heads, eps)
        self.crossattention = BertAttention(d, d, cfg.num_heads, eps) if has_cross_attention else None
        self.intermediate_query = BertIntermediate(d, cfg.intermediate_size)
        self.output_query = BertOutput(cfg.intermediate_size, d, eps)

    def forward(self, queries: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = self.attention(queries, queries)
        if self.crossattention is not None:
            x = self.crossattention(x, text)
        return self.output_query(self.intermediate_query(x), x)


class _QFormerEncoder(nn.Module):
    def __init__(self, cfg: FeatureMaskConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i % cfg.cross_attention_freq == 0) for i in range(cfg.num_layers))


class _QFormerEmbeddings(nn.Module):
    def __init__(self, cfg: FeatureMaskConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class _QFormerBert(nn.Module):
    def __init__(self, cfg: FeatureMaskConfig):
        super().__init__()
        self.embeddings = _QFormerEmbeddings(cfg)
        self.encoder = _QFormerEncoder(cfg)


class _QFormer(nn.Module):
    def __init__(self, cfg: FeatureMaskConfig):
        super().__init__()
        self.bert = _QFormerBert(cfg)


class FeatureOptimizationMask(nn.Module):
    def __init__(self, cfg: FeatureMaskConfig):
        super().__init__()
        self.cfg = cfg
        self.resize_linear = nn.Linear(cfg.text_width, cfg.hidden_size)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size))
        self.Qformer = _QFormer(cfg)
        self.zero_layer = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        nn.init.normal_(self.query_tokens, std=0.02)
        nn.init.zeros_(self.zero_layer.weight)
        nn.init.zeros_(self.zero_layer.bias)

    def mask(self, pooled_text: torch.Tensor) -> torch.Tensor:
        """pooled text (B, Dt) -> M_t (B, N, D)."""
        text = self.resize_linear(pooled_text)[:, None]  # (B, 1, D)
        bert = self.Qformer.bert
        x = bert.embeddings.LayerNorm(self.query_tokens.expand(text.shape[0], -1, -1))  # (B, N, D)
        for layer in bert.encoder.layer:
            x = layer(x, text)
        return x

    def forward(self, pooled_text: torch.Tensor) -> torch.Tensor:
        """pooled text (B, Dt) -> Z(M_t) (B, N, D), the term added to the selected vision features."""
        return self.zero_layer(self.mask(pooled_text))
