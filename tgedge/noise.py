"""The reference's own numerical noise: how far its fp32 arithmetic is from the same model computed in float64.

A correct fp32 export differs from the fp32 reference by rounding alone, under another accumulation order, so by
about as much as the reference itself differs from exact arithmetic (float64 stands in for exact: 2^29 times finer).
That distance grows with depth, width and activation scale, which is why a fixed limit that fits a 2-layer demo fails a
correct 24-layer decoder; measured per stage on the checkpoint at hand, it is the unit `tgedge.drift` sets fp32 limits
in. Memory: a stage's modules are turned to float64 one at a time and back (fp32 -> float64 -> fp32 is exact), the
decoder layer by layer, so the extra memory is one vision tower or one decoder layer, never a second model.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


@contextlib.contextmanager
def in_float64(*modules: torch.nn.Module):
    for m in modules:
        m.double()
    try:
        yield
    finally:
        for m in modules:
            m.float()


def _float64(feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, np.float64) if np.issubdtype(np.asarray(v).dtype, np.floating)
                                else np.asarray(v)) for k, v in feed.items()}


@torch.no_grad()
def module_exact(module: torch.nn.Module, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """A stage's graph module (export's `GraphSpec.module`) in float64 on `feed`, float inputs widened: what export's
    check compares the fp32 module's outputs with. The module's weights are float64 while it runs (its own memory
    once more), then fp32 again, bit for bit."""
    with in_float64(module):
        out = module(*[v.double() if v.is_floating_point() else v for v in feed.values()])
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]


@torch.no_grad()
def stage_exact(model, name: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One encoder-side stage (text_guide, vision, fusion, embed) of the reference in float64, on `feed`."""
    modules = [model.get_submodule(p.rstrip(".")) for p in model.stage_prefixes(name)]
    with in_float64(*modules):
        out = model.run_stage(name, _float64(feed))
    return {k: v.numpy() for k, v in out.items()}


@torch.no_grad()
def forced_logits_exact(model, x: np.ndarray, tokens: list[int]) -> np.ndarray:
    """The logits (n, V) before each of `tokens`, the prompt embeddings x (1, T, D) then `tokens[:-1]`, computed in
    float64 in one causal pass, one decoder layer in float64 at a time (what `generate.forced_logits` gives in fp32)."""
    lm = model.language_model
    prompt = torch.from_numpy(np.asarray(x, np.float64))
    with in_float64(lm.embed_tokens):
        answer = lm.embed_tokens(torch.tensor([tokens[:-1]], dtype=torch.int64))
    h = torch.cat([prompt, answer], dim=1)  # (1, T + n - 1, D)
    t = prompt.shape[1]
    pos = torch.arange(h.shape[1])
    cos, sin = lm.rope(pos, torch.float64)
    mask = torch.zeros(len(pos), len(pos), dtype=torch.float64).masked_fill(pos[None, :] > pos[:, None],
                                                                             torch.finfo(torch.float64).min)
    lm.clear_cache()
    for layer in lm.layers:
        with in_float64(layer):
            h = layer(h, cos, sin, mask, pos)
    head = lm.embed_tokens if model.cfg.decoder.tie_word_embeddings else model.lm_head
    with in_float64(lm.norm, head):
        logits = model.lm_logits(lm.norm(h))
    return logits[0, t - 1:].numpy()
