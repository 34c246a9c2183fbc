"""Small building blocks shared by the model components."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tgedge.errors import TgedgeError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,  # exact (erf), as nn.GELU() and BERT's "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise TgedgeError(f"unsupported activation {name!r} (supported: {', '.join(_ACTIVATIONS)})") from None


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 for what is computed in fp32 (norms, softmax) whatever the weights' dtype, float64 kept: the reference run
    in float64 measures its own fp32 rounding (tgedge.noise). A dtype test, so traced graphs are unchanged."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    """LLaMA / Idefics2 RMSNorm: normalise in fp32, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = at_least_fp32(x)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention written as MatMul/Softmax so that it exports to plain ONNX ops.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv; mask: additive, broadcast to
    (B, H, Tq, Tk). Keys/values are repeated for grouped-query attention.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(at_least_fp32(scores), dim=-1).to(q.dtype), v)


class MultiHeadAttention(nn.Module):
    """Queries from x, keys and values from a context (x itself for self-attention), one Linear each, then an
    output Linear; `names` are the checkpoint's names of the four projections (CLIP: q_proj ... out_proj; BERT:
    query, key, value and no output here, it is BertOutput's). The modules differ only by those names."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, names: tuple[str, str, str, str | None]):
        super().__init__()
        self.num_heads, self.names = num_heads, names
        q, k, v, out = names
        setattr(self, q, nn.Linear(dim, dim))
        setattr(self, k, nn.Linear(kv_dim, dim))
        setattr(self, v, nn.Linear(kv_dim, dim))
        if out is not None:
            setattr(self, out, nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v, out = (getattr(self, n) if n else None for n in self.names)
        context = x if context is None else context
        h = self.num_heads
        q, k, v = split_heads(q(x), h), split_heads(k(context), h), split_heads(v(context), h)  # (B, H, T, Dh)
        y = merge_heads(attention(q, k, v, mask))  # (B, Tq, D)
        return out(y) if out is not None else y


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)  # (B, H, T, D)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)  # (B, T, H*D)
