"""One declarative spec per exported graph (optimum `OnnxConfig` style).

A spec takes its graph's inputs and outputs (names, dtypes, symbolic dims) from the stage contract
(`tgedge.contract`), wraps the model's stage as a module with exactly those inputs (`tgedge.model.graphs`),
makes seeded dummy inputs for any setting of the symbolic dims, and carries its own validation tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tgedge.contract import BATCH, GUIDE, PAST, SEQ, VIEWS, StageContract, TensorMeta
from tgedge.model.graphs import stage_graph


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    make_inputs: Callable[[dict[str, int], torch.Generator], dict[str, torch.Tensor]]
    check_shapes: tuple[dict[str, int], dict[str, int]]  # two settings of the dims to validate at
    prefixes: tuple[str, ...] = ()  # the model's parameters the module computes with (loaded for this graph only)
    written: bool = False  # written from the config with streamed weights (export/decoder_graph.py), not traced
    # the part of an output that is defined at a setting of the dims (all of it when None): a static cache's
    # present buffer is defined at the written positions only, unless onnxruntime shares it with the past
    defined: Callable[[str, dict[str, int]], tuple] | None = None

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.outputs}


DTYPE_OF = {"float32": torch.float32, "float16": torch.float16}


def _normal(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _spec(model, contract: StageContract, stage: str, make, check_shapes, written: bool = False,
          defined=None) -> GraphSpec:
    s = contract.stages[stage]
    return GraphSpec(stage, stage_graph(model, stage, contract.cache.mode), list(s.inputs), list(s.outputs), make,
                     check_shapes, model.stage_prefixes(stage), written, defined)


# -- the specs ----------------------------------------------------------------------------------------------
def text_guide_spec(model, contract: StageContract) -> GraphSpec:
    cfg = model.cfg.text_guide
    vocab, eos = cfg.vocab_size, cfg.eos_token_id

    def make(dims, gen):
        ids = torch.randint(1, vocab, (dims[BATCH], dims[GUIDE]), generator=gen)
        ids[:, -1] = eos if eos != 2 else vocab - 1  # CLIP pools at the EOS
        return {"input_ids": ids}

    return _spec(model, contract, "text_guide", make,
                 ({BATCH: 1, GUIDE: 7}, {BATCH: 2, GUIDE: min(19, cfg.max_position_embeddings)}))


def vision_spec(model, contract: StageContract) -> GraphSpec:
    cfg = model.cfg.vision

    def make(dims, gen):
        return {"pixel_values": _normal(gen, dims[VIEWS], cfg.num_channels, cfg.image_size, cfg.image_size)}

    return _spec(model, contract, "vision", make, ({VIEWS: 1}, {VIEWS: 5}))


def fusion_spec(model, contract: StageContract) -> GraphSpec:
    cfg = model.cfg
    inputs = contract.stages["fusion"].inputs

    def make(dims, gen):
        shapes = {t.name: [dims[d] if isinstance(d, str) else d for d in t.shape] for t in inputs}
        return {name: _normal(gen, *shape) for name, shape in shapes.items()}

    guide = cfg.text_guide.max_position_embeddings if cfg.text_guide else 8
    return _spec(model, contract, "fusion", make, ({BATCH: 1, GUIDE: 5}, {BATCH: 2, GUIDE: min(17, guide)}))


def embed_spec(model, contract: StageContract) -> GraphSpec:
    cfg = model.cfg.decoder

    def make(dims, gen):
        return {"input_ids": torch.randint(0, cfg.vocab_size, (dims[BATCH], dims[SEQ]), generator=gen)}

    return _spec(model, contract, "embed", make, ({BATCH: 1, SEQ: 7}, {BATCH: 2, SEQ: 33}), written=True)


def decoder_spec(model, contract: StageContract) -> GraphSpec:
    cfg, cache = model.cfg.decoder, contract.cache

    def make(dims, gen):  # called with the decoder's weights loaded
        emb_scale = float(model.language_model.embed_tokens.weight.detach().std())
        b, t, p = dims[BATCH], dims[SEQ], dims[PAST]
        feed = {"inputs_embeds": _normal(gen, b, t, cfg.hidden_size, scale=emb_scale),
                "attention_mask": torch.ones(b, p + t, dtype=torch.int64)}
        if not cache.shares_buffer:
            feed["position_ids"] = (torch.arange(t) + p).expand(b, t).contiguous()
        length = cache.max_length if cache.shares_buffer else p  # static: random past the written positions, too
        for name in cache.past_names():
            feed[name] = _normal(gen, b, cache.num_kv_heads, length, cache.head_dim).to(DTYPE_OF[cache.dtype])
        return feed

    def defined(output, dims):  # a static buffer: the positions written so far
        return (Ellipsis,) if output == "logits" else (slice(None), slice(None), slice(0, dims[PAST] + dims[SEQ]))

    return _spec(model, contract, "decoder", make, ({BATCH: 1, SEQ: 7, PAST: 0}, {BATCH: 1, SEQ: 33, PAST: 12}),
                 written=True, defined=defined if cache.shares_buffer else None)


# Registered specs, one per stage of the contract; tests check that each has a test.
SPECS = {"text_guide": text_guide_spec, "vision": vision_spec, "fusion": fusion_spec, "embed": embed_spec,
         "decoder": decoder_spec}


def graph_specs(model, contract: StageContract) -> list[GraphSpec]:
    """One spec per stage of the model's contract."""
    return [SPECS[name](model, contract) for name in contract.stage_names]
