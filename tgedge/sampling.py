"""Token selection and stopping, in numpy so that the reference and the torch-free runtime share it.

The decode loops (tgedge.generate for torch, the runtime's for ONNX/TensorRT) call `Sampler.pick` on the
last logits and `StopCriteria.done` after each token; they know nothing else about text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tgedge.errors import TgedgeError


@dataclass
class GenerationOptions:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self):
        """Every problem in one message; NaN fails every comparison, so each check is written to refuse it."""
        problems = []
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not (_is_real(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be a finite number >= 0 (got {self.temperature})")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            problems.append(f"top_k must be >= 0 (got {self.top_k})")
        if not (_is_int(self.seed) and self.seed >= 0):
            problems.append(f"seed must be an integer >= 0 (got {self.seed})")
        if problems:
            raise TgedgeError("; ".join(problems))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


class Sampler:
    """Greedy, or seeded temperature / top-k / top-p sampling (the same seed gives the same tokens)."""

    def __init__(self, options: GenerationOptions):
        self.options = options
        self.rng = np.random.default_rng(options.seed)

    def pick(self, logits: np.ndarray) -> int:
        """logits (V,) -> token id."""
        o = self.options
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if o.temperature == 0:
            return int(np.argmax(logits))
        # In log space, the largest logit first: z <= 0 with its maximum at 0, so no temperature, however small,
        # overflows into inf - inf = NaN; as the temperature goes to 0 every z but the largest goes to -inf, which
        # is greedy (the limit, reached where the division underflows, e.g. a temperature of 1e-308).
        with np.errstate(over="ignore"):
            logits = (logits - logits.max()) / o.temperature
        if o.top_k:
            kth = np.sort(logits)[-min(o.top_k, logits.size)]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits)
        probs /= probs.sum()
        if o.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, o.top_p)) + 1]  # smallest set with mass >= top_p
            mask = np.zeros_like(probs)
            mask[keep] = 1
            probs = probs * mask / (probs * mask).sum()
        return int(self.rng.choice(probs.size, p=probs))


class StopCriteria:
    """EOS ids and stop strings. `decode` turns generated ids into text (the loop itself never does)."""

    def __init__(self, options: GenerationOptions, decode: Callable[[list[int]], str] | None = None):
        self.eos = set(options.eos_token_ids)
        self.stop_strings = [s for s in options.stop_strings if s]
        self.decode = decode

    def done(self, tokens: list[int]) -> bool:
        if tokens and tokens[-1] in self.eos:
            return True
        if self.stop_strings and self.decode is not None:
            text = self.decode(tokens)
            return any(s in text for s in self.stop_strings)
        return False

    def clean(self, text: str) -> str:
        """Cut the text at the first stop string."""
        cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
        return text[:cut] if cut >= 0 else text
