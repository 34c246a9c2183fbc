"""Decode loop for the PyTorch reference (gpt-fast style): prefill, decode_one_token, generate."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tgedge.errors import TgedgeError
from tgedge.sampling import GenerationOptions, Sampler, StopCriteria


@dataclass
class GenerationResult:
    tokens: list[int]
    timings: dict[str, float] = field(default_factory=dict)  # seconds


@torch.no_grad()
def prefill(model, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Embeddings (1, T, D) at input_pos (T,) -> last logits (1, V); fills the KV cache."""
    return model(x, input_pos)[:, -1]


@torch.no_grad()
def decode_one_token(model, token: int, pos: int) -> torch.Tensor:
    """One generated token at position `pos` -> logits (1, V). A generated id is always text, even the
    image token's id, so it goes through the embedding table directly (as transformers does)."""
    x = model.language_model.embed_tokens(torch.tensor([[token]]))
    return model(x, torch.tensor([pos]))[:, -1]


def fit_to_context(prompt_len: int, max_new_tokens: int, context: int) -> int:
    """How many tokens may be generated; a prompt that leaves no room is a user error."""
    if prompt_len >= context:
        raise TgedgeError(f"prompt is {prompt_len} tokens (image tokens included), longer than the context ({context})")
    return min(max_new_tokens, context - prompt_len)


@torch.no_grad()
def generate(model, x: torch.Tensor, options: GenerationOptions, context: int,
             stop: StopCriteria | None = None, on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Greedy or sampled decoding from prompt embeddings (1, T, D)."""
    t = x.shape[1]
    n = fit_to_context(t, options.max_new_tokens, context)
    sampler, stop = Sampler(options), stop or StopCriteria(options)
    model.language_model.setup_cache(1, t + n)
    try:
        start = time.perf_counter()
        logits = prefill(model, x, torch.arange(t))
        tokens = [sampler.pick(logits[0].numpy())]
        first = time.perf_counter()
        if on_token:
            on_token(tokens[-1])
        while len(tokens) < n and not stop.done(tokens):
            logits = decode_one_token(model, tokens[-1], t + len(tokens) - 1)
            tokens.append(sampler.pick(logits[0].numpy()))
            if on_token:
                on_token(tokens[-1])
        end = time.perf_counter()
    finally:
        model.language_model.clear_cache()
    steps = max(len(tokens) - 1, 1)
    return GenerationResult(tokens, {"prefill_s": first - start, "decode_s": end - first,
                                     "decode_tokens_per_s": steps / max(end - first, 1e-9)})
