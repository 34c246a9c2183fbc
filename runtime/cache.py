"""The decoder's KV cache on the runtime side: one object, its mode a subclass (nanochat's `KVCache`,
gpt-fast's `KVCache.update`, onnxruntime-genai's past/present names).

The manifest's `kv_cache` section (a `tgedge.contract.CacheLayout`) says the names, shape, dtype and mode; the
pipeline asks the cache for the decoder's feed (`feed(...)`) and hands it each step's outputs (`update(...)`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tgedge.contract import CacheLayout
from tgedge.errors import TgedgeError


class KVCache:
    """A decoder's past keys and values between steps. `length` positions are cached."""

    def __init__(self, layout: CacheLayout):
        self.layout = layout
        self.length = 0
        self.capacity = 0

    def reset(self, capacity: int) -> None:
        """Start a new sequence of at most `capacity` positions."""
        self.capacity, self.length = capacity, 0

    def clear(self) -> None:
        self.capacity, self.length = 0, 0

    def empty(self) -> dict[str, np.ndarray]:
        """Past tensors holding nothing (batch 1): the feed of a prefill from scratch."""
        shape = (1, self.layout.num_kv_heads, 0, self.layout.head_dim)
        return {n: np.zeros(shape, np.dtype(self.layout.dtype)) for n in self.layout.past_names()}

    @property
    def keep(self) -> tuple[str, ...]:
        """Decoder outputs the backend should leave where it put them (on the device) for the next step."""
        return ()

    def feed(self) -> dict[str, Any]:
        raise NotImplementedError

    def update(self, outputs: dict[str, Any], new_positions: int) -> None:
        raise NotImplementedError


class GrowingCache(KVCache):
    """The graph concatenates: past (P positions) in, present (P + T) out, and present becomes the next past."""

    def reset(self, capacity: int) -> None:
        super().reset(capacity)
        self._past = self.empty()

    def clear(self) -> None:
        super().clear()
        self._past = {}

    @property
    def keep(self) -> tuple[str, ...]:
        return tuple(self.layout.present_names())

    def feed(self) -> dict[str, Any]:
        return self._past

    def update(self, outputs: dict[str, Any], new_positions: int) -> None:
        if self.length + new_positions > self.capacity:
            raise TgedgeError(f"{self.length + new_positions} positions exceed the cache ({self.capacity})")
        self._past = {past: outputs[present] for past, present in self.layout.present_for().items()}
        self.length += new_positions


CACHES: dict[str, type[KVCache]] = {"growing": GrowingCache}


def make_cache(layout: CacheLayout) -> KVCache:
    return CACHES[layout.mode](layout)
