"""A batched static KV cache: `slots` sequences in one buffer per layer, decoded together (TensorRT-LLM's in-flight
batching, vLLM's continuous batching, over a static cache as onnxruntime-genai's `past_present_share_buffer`).

Each past/present pair is one buffer (slots, Hkv, M, D) at the export's max context, bound in place as
`runtime.cache.StaticCache` binds its batch-1 buffer. Each slot has its own length; the decoder graph takes each row's
from its attention mask's sum (ones, then zeros to the longest row's length: `CacheLayout.row_lengths`), so one call
decodes every active slot however long each is. The scheduler (`runtime.scheduler`) drives it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tgedge.errors import TgedgeError, TgedgeInternalError


def cache_problem(layout) -> str | None:
    """Why an export's KV cache layout (`CacheLayout`) cannot hold many sequences decoded in one call, or None: it
    must be static (past and present one buffer, so a slot's rows are written in place) with a decoder that takes
    each row's length (exports since row_lengths)."""
    if not layout.shares_buffer:
        return (f"batched decoding needs a static KV cache; this export's is {layout.mode!r}: export with --cache "
                "static (onnxruntime) or --cache static-onnx")
    if not layout.row_lengths:
        return (f"this {layout.mode} export's decoder takes one length for every row (written before batched "
                "decoding): export the model again to decode requests together")
    return None


def batching_problem(pipe) -> str | None:
    """Why this pipeline's decoder cannot decode many sequences in one call, or None: `cache_problem`, and its
    runner must bind rows of its buffers (onnxruntime's, TensorRT's) or none at all (host arrays), and an engine
    must have been built for more than one sequence."""
    problem = cache_problem(pipe.contract.cache)
    if problem:
        return problem
    runner = pipe.runners["decoder"]
    if callable(getattr(runner, "bind", None)) and not getattr(runner, "binds_rows", False):
        return f"the {type(runner).__name__} binds whole KV buffers, not a slot's rows"
    if getattr(runner, "max_batch", None) == 1:
        return ("the decoder engine's profiles hold one sequence: build the engines with tgedge build --max-batch N "
                "to decode N requests together")
    return None


class BatchedDecoder:
    """The decoder of a `Pipeline` over a batched static KV cache of `slots` sequences.

    A newcomer's prompt is prefilled alone, a batch-1 call on its slot's row: the decoder's inputs are rectangular
    (B, S, D), so a prompt of T positions beside decode rows of 1 would pad every row to T, T times the decode rows'
    work (chunked prefill beside the decode rows: not done). Decode is one call over rows 0 .. n-1, n the highest
    active slot + 1: slots are taken lowest first, so the active ones stay packed at the front; a free slot below n
    rides along (one position written at its start, its logits dropped) rather than the batch being gathered.

    With a runner that binds rows of its buffers (`binds_rows`: onnxruntime's), the buffers live on the decoder's
    device and each row range is bound once, by address; otherwise (a recording or wrapping runner) they are host
    arrays, each call's present copied back into its rows (correct, with a copy per step)."""

    def __init__(self, pipe, slots: int):
        layout = pipe.contract.cache
        problem = batching_problem(pipe)
        if problem:
            raise TgedgeError(problem)
        if not (isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1):
            raise TgedgeError(f"slots must be an integer >= 1 (got {slots!r})")
        most = getattr(pipe.runners["decoder"], "max_batch", None)
        if most is not None and slots > most:
            raise TgedgeError(f"{slots} slots: the decoder engine decodes at most {most} sequences per call (its "
                              f"profiles' batch maximum, tgedge build --max-batch): use at most {most} slots, or "
                              "build again with a larger --max-batch")
        self.pipe, self.layout, self.slots = pipe, layout, slots
        self.lengths = [0] * slots  # positions filled per slot
        self._free = list(range(slots))  # ascending: the lowest is taken first
        runner = pipe.runners["decoder"]
        self.shared = all(callable(getattr(runner, n, None)) for n in ("buffer", "bind")) and \
            getattr(runner, "binds_rows", False)
        shape = (slots, layout.num_kv_heads, layout.max_length, layout.head_dim)
        self.buffers: dict[str, Any] = {n: runner.buffer(shape, layout.dtype) if self.shared
                                        else np.zeros(shape, layout.dtype) for n in layout.past_names()}
        self._bound: dict[tuple[int, int], Any] = {}  # (start, stop) -> the runner's binding of those rows
        self._runner = runner

    # -- slots --------------------------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise TgedgeInternalError("no free slot: the scheduler admits only into free slots")
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        """The slot is free at once; its stale positions need no clearing (a prefill writes from position 0)."""
        if slot in self._free:
            raise TgedgeInternalError(f"slot {slot} released twice")
        self.lengths[slot] = 0
        self._free.append(slot)
        self._free.sort()

    # -- steps --------------------------------------------------------------------------------------------------
    def prefill(self, slot: int, x: np.ndarray) -> np.ndarray:
        """Prompt embeddings (1, T, D) into a slot just acquired -> the last position's logits (V,)."""
        t = x.shape[1]
        self._room(slot, t)
        out = self._run(slot, slot + 1, x, np.ones((1, t), np.int64))
        self.lengths[slot] = t
        return out["logits"][0, -1]

    def decode(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        """One new token per active slot (slot -> its last token), one decoder call -> slot -> logits (V,)."""
        rows = max(tokens) + 1
        ids = np.zeros((rows, 1), np.int64)
        filled = np.ones(rows, np.int64)  # after this step; a free row in the range: its position 0
        for slot, token in tokens.items():
            self._room(slot, 1)
            ids[slot, 0] = token
            filled[slot] = self.lengths[slot] + 1
        mask = (np.arange(filled.max())[None] < filled[:, None]).astype(np.int64)  # (rows, longest)
        out = self._run(0, rows, self.pipe.embed_tokens(ids), mask)
        for slot in tokens:
            self.lengths[slot] += 1
        return {slot: out["logits"][slot, -1] for slot in tokens}

    def _room(self, slot: int, new: int) -> None:
        if self.lengths[slot] + new > self.layout.max_length:
            raise TgedgeError(f"slot {slot}: {self.lengths[slot] + new} positions exceed the static cache "
                              f"({self.layout.max_length}, the export's max context)")

    def _run(self, start: int, stop: int, x: np.ndarray, mask: np.ndarray) -> dict:
        feed = {"inputs_embeds": x, "attention_mask": mask}
        if self.shared:
            bound = self._bound.get((start, stop))
            if bound is None:
                bound = self._bound[start, stop] = self._runner.bind(self.buffers, self.layout.present_for(),
                                                                     rows=(start, stop))
            return self.pipe.run_stage("decoder", {**feed, **bound.inputs}, keep=(), bound=bound)
        out = self.pipe.run_stage("decoder", {**feed, **{n: b[start:stop] for n, b in self.buffers.items()}})
        for past, present in self.layout.present_for().items():
            self.buffers[past][start:stop] = out[present]
        return out
