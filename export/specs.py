"""One declarative spec per exported graph (optimum `OnnxConfig` style).

A spec names the graph's inputs and outputs with their symbolic dims, wraps the reference model's stage
as a module with exactly those inputs, makes seeded dummy inputs for any setting of the symbolic dims, and
carries its own validation tolerance. The runtime's `Pipeline` feeds the graphs with the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tgedge.model.decoder import PastKV
from tgedge.runtime.manifest import TensorMeta

# Symbolic dims, named as optimum and onnxruntime-genai name them.
BATCH, VIEWS, GUIDE = "batch_size", "num_views", "guide_sequence_length"
SEQ, PAST, TOTAL = "sequence_length", "past_sequence_length", "total_sequence_length"


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    make_inputs: Callable[[dict[str, int], torch.Generator], dict[str, torch.Tensor]]
    check_shapes: tuple[dict[str, int], dict[str, int]]  # two settings of the dims to validate at
    atol: float = 1e-4
    rtol: float = 1e-5  # of the reference output's largest magnitude

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.outputs}


def _normal(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


# -- wrappers: each stage with exactly its graph's inputs and outputs ----------------------------------------
class _ModelGraph(nn.Module):
    """A stage of the model as its own graph: holds the model, so parameter names stay `model.*`."""

    def __init__(self, model):
        super().__init__()
        self.model = model


class TextGuideGraph(_ModelGraph):
    def forward(self, input_ids):
        return self.model.text_guide(input_ids)


class VisionGraph(_ModelGraph):
    def forward(self, pixel_values):
        return self.model.vision(pixel_values)


class FusionGraph(_ModelGraph):
    def __init__(self, model):
        super().__init__(model)
        self.with_fom = model.mm_cross_attn is not None
        self.with_dp = model.mm_patch_encoder is not None

    def forward(self, features, *extra):
        extra = list(extra)
        crops = extra.pop(0) if self.with_dp else None
        tokens = extra.pop(0) if self.with_dp else None
        pooled = extra.pop(0) if self.with_fom else None
        return self.model.fuse(features, crops, tokens, pooled)


class EmbedGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.language_model.embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class DecoderGraph(_ModelGraph):
    """inputs_embeds + attention_mask + position_ids + past -> logits + present (one graph, prefill and decode)."""

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        dec = self.model.language_model
        t, p = inputs_embeds.shape[1], past[0].shape[2]
        caches = [PastKV(past[2 * i], past[2 * i + 1]) for i in range(len(dec.layers))]
        for layer, cache in zip(dec.layers, caches):
            layer.self_attn.kv_cache = cache
        try:
            cos, sin = dec.rope(position_ids, inputs_embeds.dtype)  # (B, T, D)
            q_idx = torch.arange(t, device=inputs_embeds.device) + p  # (T,)
            k_idx = torch.arange(p + t, device=inputs_embeds.device)  # (S,)
            allowed = (k_idx[None, :] <= q_idx[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
            mask = torch.where(allowed, 0.0, torch.finfo(inputs_embeds.dtype).min)  # (B, 1, T, S)
            h = dec.run_layers(inputs_embeds, cos[:, None], sin[:, None], mask, None)
            logits = self.model.lm_logits(h)
        finally:
            for layer in dec.layers:
                layer.self_attn.kv_cache = None
        return (logits, *[x for c in caches for x in (c.k, c.v)])


# -- the specs ----------------------------------------------------------------------------------------------
def text_guide_spec(model) -> GraphSpec:
    cfg = model.cfg.text_guide
    vocab, eos = cfg.vocab_size, cfg.eos_token_id

    def make(dims, gen):
        ids = torch.randint(1, vocab, (dims[BATCH], dims[GUIDE]), generator=gen)
        ids[:, -1] = eos if eos != 2 else vocab - 1  # CLIP pools at the EOS
        return {"input_ids": ids}

    return GraphSpec(
        "text_guide", TextGuideGraph(model),
        [TensorMeta("input_ids", "int64", (BATCH, GUIDE))],
        [TensorMeta("text_features", "float32", (BATCH, GUIDE, cfg.hidden_size)),
         TensorMeta("text_pooled", "float32", (BATCH, cfg.hidden_size))],
        make, ({BATCH: 1, GUIDE: 7}, {BATCH: 2, GUIDE: min(19, cfg.max_position_embeddings)}))


def vision_spec(model) -> GraphSpec:
    cfg = model.cfg.vision
    n = cfg.num_patches + (0 if cfg.select_strategy == "default" else 1)

    def make(dims, gen):
        return {"pixel_values": _normal(gen, dims[VIEWS], cfg.num_channels, cfg.image_size, cfg.image_size)}

    return GraphSpec(
        "vision", VisionGraph(model),
        [TensorMeta("pixel_values", "float32", (VIEWS, cfg.num_channels, cfg.image_size, cfg.image_size))],
        [TensorMeta("image_features", "float32", (VIEWS, n, cfg.hidden_size))],
        make, ({VIEWS: 1}, {VIEWS: 5}))


def fusion_spec(model) -> GraphSpec:
    cfg = model.cfg
    n, dv = cfg.vision.num_patches + (0 if cfg.vision.select_strategy == "default" else 1), cfg.vision.hidden_size
    inputs = [TensorMeta("image_features", "float32", (BATCH, n, dv))]
    if cfg.detail_perceiver is not None:
        inputs += [TensorMeta("crop_features", "float32", (BATCH, 4 * n, dv)),
                   TensorMeta("text_features", "float32", (BATCH, GUIDE, cfg.text_guide.hidden_size))]
    if cfg.feature_mask is not None:
        inputs.append(TensorMeta("text_pooled", "float32", (BATCH, cfg.text_guide.hidden_size)))

    def make(dims, gen):
        shapes = {t.name: [dims[d] if isinstance(d, str) else d for d in t.shape] for t in inputs}
        return {name: _normal(gen, *shape) for name, shape in shapes.items()}

    guide = cfg.text_guide.max_position_embeddings if cfg.text_guide else 8
    return GraphSpec(
        "fusion", FusionGraph(model), inputs,
        [TensorMeta("image_embeds", "float32", (BATCH, cfg.num_image_tokens, cfg.decoder.hidden_size))],
        make, ({BATCH: 1, GUIDE: 5}, {BATCH: 2, GUIDE: min(17, guide)}))


def embed_spec(model) -> GraphSpec:
    cfg = model.cfg.decoder

    def make(dims, gen):
        return {"input_ids": torch.randint(0, cfg.vocab_size, (dims[BATCH], dims[SEQ]), generator=gen)}

    return GraphSpec(
        "embed", EmbedGraph(model),
        [TensorMeta("input_ids", "int64", (BATCH, SEQ))],
        [TensorMeta("inputs_embeds", "float32", (BATCH, SEQ, cfg.hidden_size))],
        make, ({BATCH: 1, SEQ: 7}, {BATCH: 2, SEQ: 33}), atol=0.0, rtol=0.0)


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def decoder_spec(model) -> GraphSpec:
    cfg = model.cfg.decoder
    kv = (BATCH, cfg.num_kv_heads, PAST, cfg.head_dim)
    emb_scale = float(model.language_model.embed_tokens.weight.detach().std())

    def make(dims, gen):
        b, t, p = dims[BATCH], dims[SEQ], dims[PAST]
        feed = {"inputs_embeds": _normal(gen, b, t, cfg.hidden_size, scale=emb_scale),
                "attention_mask": torch.ones(b, p + t, dtype=torch.int64),
                "position_ids": (torch.arange(t) + p).expand(b, t).contiguous()}
        for name in past_names(cfg.num_layers):
            feed[name] = _normal(gen, b, cfg.num_kv_heads, p, cfg.head_dim)
        return feed

    return GraphSpec(
        "decoder", DecoderGraph(model),
        [TensorMeta("inputs_embeds", "float32", (BATCH, SEQ, cfg.hidden_size)),
         TensorMeta("attention_mask", "int64", (BATCH, TOTAL)),
         TensorMeta("position_ids", "int64", (BATCH, SEQ))]
        + [TensorMeta(n, "float32", kv) for n in past_names(cfg.num_layers)],
        [TensorMeta("logits", "float32", (BATCH, SEQ, cfg.vocab_size))]
        + [TensorMeta(n, "float32", (BATCH, cfg.num_kv_heads, TOTAL, cfg.head_dim))
           for n in present_names(cfg.num_layers)],
        make, ({BATCH: 1, SEQ: 7, PAST: 0}, {BATCH: 1, SEQ: 33, PAST: 12}))


# Registered specs in pipeline order; tests check that each has a test.
SPECS = {"text_guide": text_guide_spec, "vision": vision_spec, "fusion": fusion_spec, "embed": embed_spec,
         "decoder": decoder_spec}


def graph_specs(model) -> list[GraphSpec]:
    """The graphs this model exports: `text_guide` only when it has a text guide."""
    names = [n for n in SPECS if n != "text_guide" or (model.text_tower is not None and model.cfg.has_tg)]
    return [SPECS[n](model) for n in names]
