"""The decoder's KV cache on the runtime side: one object, its mode a subclass (nanochat's `KVCache`,
gpt-fast's `KVCache.update`, onnxruntime-genai's past/present names and `past_present_share_buffer`).

The manifest's `kv_cache` section (a `tgedge.contract.CacheLayout`) says the names, shape, dtype and mode. The
pipeline stays backend-agnostic: it asks the cache for the decoder's inputs besides the embeddings (`feed(t)`) and
the runner call's options (`options`), and hands it each step's outputs (`update(...)`); a cache that keeps device
buffers does that work with the decoder's runner (`reset(capacity, runner)`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tgedge.contract import CacheLayout
from tgedge.errors import TgedgeError


def host(value: Any) -> np.ndarray:
    """A kept output (an OrtValue, a device array) or an array, as a numpy array."""
    return value if isinstance(value, np.ndarray) else value.numpy()


class KVCache:
    """A decoder's past keys and values between steps. `length` positions are cached."""

    def __init__(self, layout: CacheLayout):
        self.layout = layout
        self.length = 0
        self.capacity = 0

    def reset(self, capacity: int, runner: Any = None) -> None:
        """Start a new sequence of at most `capacity` positions (`runner`: the decoder's, for device buffers)."""
        self.capacity, self.length = capacity, 0

    def clear(self) -> None:
        self.capacity, self.length = 0, 0

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on (they are written again before they are read)."""
        if not 0 <= length <= self.length:
            raise TgedgeError(f"cannot keep {length} positions of a cache holding {self.length}")
        self.length = length

    def empty(self) -> dict[str, np.ndarray]:
        """Past tensors holding nothing (batch 1): the feed of a prefill from scratch."""
        shape = (1, self.layout.num_kv_heads, 0, self.layout.head_dim)
        return {n: np.zeros(shape, np.dtype(self.layout.dtype)) for n in self.layout.past_names()}

    @property
    def keep(self) -> tuple[str, ...]:
        """Decoder outputs the backend should leave where it put them (on the device) for the next step."""
        return ()

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments of the decoder runner's `infer` for a step."""
        return {"keep": self.keep}

    def feed(self, t: int) -> dict[str, Any]:
        """The decoder's inputs besides `inputs_embeds`, for a step of `t` new positions."""
        raise NotImplementedError

    def update(self, outputs: dict[str, Any], new_positions: int) -> None:
        raise NotImplementedError

    def _room(self, new_positions: int) -> None:
        if self.length + new_positions > self.capacity:
            raise TgedgeError(f"{self.length + new_positions} positions exceed the cache ({self.capacity})")

    def _grow(self, new_positions: int) -> None:
        self._room(new_positions)
        self.length += new_positions


class GrowingCache(KVCache):
    """The graph concatenates: past (P positions) in, present (P + T) out, and present becomes the next past."""

    def reset(self, capacity: int, runner: Any = None) -> None:
        super().reset(capacity)
        self._past = self.empty()

    def clear(self) -> None:
        super().clear()
        self._past = {}

    @property
    def keep(self) -> tuple[str, ...]:
        return tuple(self.layout.present_names())

    def feed(self, t: int) -> dict[str, Any]:
        p = self.length
        return {"attention_mask": np.ones((1, p + t), np.int64),
                "position_ids": np.arange(p, p + t, dtype=np.int64)[None], **self._past}

    def update(self, outputs: dict[str, Any], new_positions: int) -> None:
        self._grow(new_positions)
        self._past = {past: outputs[present] for past, present in self.layout.present_for().items()}

    def truncate(self, length: int) -> None:
        keep = length < self.length  # the past tensors hold every position: cut them (on the host, once a turn)
        super().truncate(length)
        if keep:
            self._past = {n: np.ascontiguousarray(host(v)[:, :, :length]) for n, v in self._past.items()}


class StaticCache(KVCache):
    """One buffer per past/present pair at the export's max context (batch 1), allocated once on the decoder's
    device and bound once as both the past input and the present output: the graph (GroupQueryAttention, or
    TensorScatter in the static-onnx form) writes the step's keys and values in place at positions length ..
    length + T - 1. Per step nothing of the cache is allocated or copied; the attention mask is a view of one
    preallocated row of ones (its length says how many positions are filled).

    With a runner that cannot bind buffers (`buffer` / `bind`: a recording or remote runner), the buffers are host
    arrays and each step's present becomes the next past, as with a growing cache (correct, with a copy per step)."""

    def __init__(self, layout: CacheLayout):
        super().__init__(layout)
        self.buffers: dict[str, Any] = {}  # past name -> its buffer (B, Hkv, M, D)
        self.bound: Any = None  # the runner's binding of the buffers (None: fed each step)
        self._runner: Any = None
        self._mask = np.ones((1, layout.max_length), np.int64)

    def reset(self, capacity: int, runner: Any = None) -> None:
        if capacity > self.layout.max_length:
            raise TgedgeError(f"{capacity} positions exceed the static cache ({self.layout.max_length}, the export's "
                              "max context)")
        super().reset(capacity)
        if not self.buffers or runner is not self._runner:
            self._allocate(runner)
        # stale positions need no clearing: the graph reads positions < length + T, and writes them first

    def _allocate(self, runner: Any) -> None:
        shape = (1, self.layout.num_kv_heads, self.layout.max_length, self.layout.head_dim)
        shared = callable(getattr(runner, "buffer", None)) and callable(getattr(runner, "bind", None))
        self.buffers = {n: runner.buffer(shape, self.layout.dtype) if shared else np.zeros(shape, self.layout.dtype)
                        for n in self.layout.past_names()}
        self.bound = runner.bind(self.buffers, self.layout.present_for()) if shared else None
        self._runner = runner

    @property
    def keep(self) -> tuple[str, ...]:
        return () if self.bound is not None else tuple(self.layout.present_names())

    @property
    def options(self) -> dict[str, Any]:
        return {"keep": self.keep, "bound": self.bound} if self.bound is not None else {"keep": self.keep}

    def feed(self, t: int) -> dict[str, Any]:
        self._room(t)  # before the graph runs: it would write past the buffers' end
        return {"attention_mask": self._mask[:, :self.length + t], **self.buffers}

    def update(self, outputs: dict[str, Any], new_positions: int) -> None:
        self._grow(new_positions)
        if self.bound is None:  # not shared: the present (the whole buffer, written) is the next past
            self.buffers = {past: outputs[present] for past, present in self.layout.present_for().items()}


CACHES: dict[str, type[KVCache]] = {"growing": GrowingCache, "static": StaticCache, "static-onnx": StaticCache}


def make_cache(layout: CacheLayout) -> KVCache:
    return CACHES[layout.mode](layout)
