"""A cache of the stage outputs that do not depend on the question (the vision tower's, per image), bounded in bytes.

    cache = StageCache(max_bytes=256 << 20)
    pipe.use_stage_cache(cache)                 # a runtime Pipeline or the TorchPipeline
    pipe.answer("a.png", "what color?")         # vision runs, its output is kept
    pipe.answer("a.png", "how many?")           # vision's output comes from the cache; text guide, fusion run again

Which stages may be cached is the fusion family's declaration (`FusionFamily.question_independent`): for TG-LLaVA only
`vision` (its text guide steers TG-FOM and TG-DP, so the fusion output and everything after depend on the question);
for plain LLaVA `vision` and `fusion` (the image embeddings); for the gated family `vision` (its fusion layers
cross-attend to the question's tokens).

The key is a digest of everything the stage's output is a function of: the stage's inputs themselves (for `vision`,
the preprocessed pixels of every view: a different image or preprocessing setting gives other bytes) and the
pipeline's identity (`StageFlow.cache_identity`: the export's manifest, the backend and its options, the
preprocessing settings; for the reference its model object and dtype). A file name is never part of it: the same file
rewritten is a miss, the same picture under two names a hit. Least recently used entries go first when the bytes
held would pass `max_bytes`; an output larger than the bound is returned and not kept.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tgedge.errors import TgedgeError

RunStage = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass
class StageCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions}


def feed_digest(identity: str, stage: str, feed: dict[str, np.ndarray]) -> str:
    """sha256 over the identity, the stage name and each input's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for part in (identity, stage):
        h.update(part.encode("utf-8") + b"\0")
    for name in sorted(feed):
        a = np.ascontiguousarray(feed[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode("utf-8") + b"\0")
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


class StageCache:
    """LRU of stage outputs (named numpy arrays) within `max_bytes`; one cache may serve several pipelines, each
    keyed apart by its identity."""

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise TgedgeError(f"stage cache bound must be a whole number of bytes >= 0 (got {max_bytes!r})")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[dict[str, np.ndarray], int]] = OrderedDict()
        self.stats: dict[str, StageCacheStats] = {}
        self.last_hit: dict[str, bool] = {}  # stage -> whether its latest run came from the cache

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def run(self, run_stage: RunStage, identity: str, stage: str, feed: dict[str, np.ndarray]) -> dict:
        """`run_stage(stage, feed)`, or its kept output for the same feed and identity (copies: callers may write)."""
        key = feed_digest(identity, stage, feed)
        stats = self.stats.setdefault(stage, StageCacheStats())
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            stats.hits += 1
            self.last_hit[stage] = True
            return {k: v.copy() for k, v in entry[0].items()}
        out = run_stage(stage, feed)
        stats.misses += 1
        self.last_hit[stage] = False
        kept = {k: np.array(v, copy=True) for k, v in out.items()}
        size = sum(v.nbytes for v in kept.values())
        if size <= self.max_bytes:
            self._entries[key] = (kept, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
                stats.evictions += 1
        return out

    def wrap(self, run_stage: RunStage, identity: str, stages: tuple[str, ...]) -> RunStage:
        """A `run_stage` that takes `stages` from the cache and runs every other stage as it is."""
        def run(stage: str, feed: dict[str, np.ndarray]) -> dict:
            if stage in stages:
                return self.run(run_stage, identity, stage, feed)
            return run_stage(stage, feed)

        return run
