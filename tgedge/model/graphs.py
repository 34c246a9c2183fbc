"""The model's stages as graph modules: exactly one stage contract's inputs (positional, in the contract's order)
and outputs. `tgedge export` traces these; they hold the model, so parameter names stay `model.*`."""

from __future__ import annotations

import torch
from torch import nn

from tgedge.model.llava import STAGE_METHODS

# masked scores: fp32's lowest, in any compute dtype (float64 included: the export check's noise, tgedge.noise)
NEG = torch.finfo(torch.float32).min


class StageGraph(nn.Module):
    """text_guide, vision, fusion: the model's stage method with the contract's inputs by position."""

    def __init__(self, model, stage: str):
        super().__init__()
        self.model = model
        self.method = STAGE_METHODS[stage]
        self.input_names = model.contract.stages[stage].input_names

    def forward(self, *inputs):
        return getattr(self.model, self.method)(**dict(zip(self.input_names, inputs)))


class EmbedGraph(nn.Module):
    """The embedding table alone (its parameter is `embed_tokens.weight` in the graph)."""

    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.language_model.embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class PastKV:
    """The growing cache of the exported decoder: past keys/values come in, present (past + new) go out."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (B, Hkv, P, D)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)  # (B, Hkv, P+T, D)
        return self.k, self.v


class DecoderGraph(nn.Module):
    """inputs_embeds + attention_mask + position_ids + past -> last-position logits + present (prefill and decode).

    `tgedge export` writes this graph directly (export/decoder_graph.py) and checks it against this module."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        dec = self.model.language_model
        t, p = inputs_embeds.shape[1], past[0].shape[2]
        caches = [PastKV(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]  # the layers fed run
        cos, sin = dec.rope(position_ids, inputs_embeds.dtype)  # (B, T, D)
        q_idx = torch.arange(t, device=inputs_embeds.device) + p  # (T,)
        k_idx = torch.arange(p + t, device=inputs_embeds.device)  # (S,)
        allowed = (k_idx[None, :] <= q_idx[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        mask = torch.where(allowed, 0.0, NEG)  # (B, 1, T, S)
        h = dec.run_layers(inputs_embeds, cos[:, None], sin[:, None], mask, None, caches)
        logits = self.model.lm_logits(h[:, -1:])  # the last position: (B, 1, V)
        return (logits, *[x for c in caches for x in (c.k, c.v)])


class StaticKV:
    """The static cache of the exported decoder: one buffer per layer at max context, written at the step's positions
    (gpt-fast's `KVCache.update`), attended over in full with the unwritten positions masked."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (B, Hkv, M, D)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Written in the buffers' dtype (an fp16 cache), attended over in the computation's."""
        self.k = self.k.index_copy(2, input_pos, k.to(self.k.dtype))  # (B, Hkv, M, D)
        self.v = self.v.index_copy(2, input_pos, v.to(self.v.dtype))
        return self.k.to(k.dtype), self.v.to(v.dtype)


class StaticDecoderGraph(nn.Module):
    """inputs_embeds + attention_mask + the static cache's buffers -> last-position logits + the buffers written at
    positions total - T .. total - 1 (total: the attention mask's length; a static cache's positions are its slots).

    What the `static` decoder graph (onnxruntime GroupQueryAttention over a shared buffer) computes; export checks
    the written positions (past them, a buffer that is not shared holds whatever the kernel leaves)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, attention_mask, *past):
        dec = self.model.language_model
        t, total, m = inputs_embeds.shape[1], attention_mask.shape[1], past[0].shape[2]
        positions = torch.arange(total - t, total, device=inputs_embeds.device)  # (T,)
        caches = [StaticKV(past[2 * i], past[2 * i + 1]) for i in range(len(dec.layers))]
        cos, sin = dec.rope(positions, inputs_embeds.dtype)  # (T, D)
        k_idx = torch.arange(m, device=inputs_embeds.device)  # (M,)
        mask = torch.where(k_idx[None, :] <= positions[:, None], 0.0, NEG)  # (T, M)
        h = dec.run_layers(inputs_embeds, cos, sin, mask.to(inputs_embeds.dtype), positions, caches)
        logits = self.model.lm_logits(h[:, -1:])  # (B, 1, V)
        return (logits, *[x for c in caches for x in (c.k, c.v)])


# by the contract's cache mode: both static forms compute what StaticDecoderGraph does
DECODER_GRAPHS = {"growing": DecoderGraph, "static": StaticDecoderGraph, "static-onnx": StaticDecoderGraph}


def stage_graph(model, stage: str, cache_mode: str = "growing") -> nn.Module:
    if stage == "embed":
        return EmbedGraph(model)
    if stage == "decoder":
        return DECODER_GRAPHS[cache_mode](model)
    return StageGraph(model, stage)
