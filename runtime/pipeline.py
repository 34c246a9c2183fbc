"""`Pipeline(export_dir, backend)`: preprocess -> text_guide -> vision -> fusion -> prefill -> decode, torch-free.

The stages are the manifest's stage contract, run by one runner per graph from the backend registry; the
stage flow (`tgedge.stageflow`) and the answer flow, sampling and streaming (`tgedge.generate`) are the
reference's own, so that `tgedge validate` compares like with like. The KV cache is a `runtime.cache.KVCache`
of the mode the manifest names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from tgedge.errors import TgedgeError
from tgedge.preprocess import Preprocessor
from tgedge.runtime.backends import BACKENDS, make_runner
from tgedge.runtime.cache import make_cache
from tgedge.runtime.manifest import Manifest, check_graph_io
from tgedge.runtime.runner import BaseRunner
from tgedge.runtime.scheduler import Scheduler
from tgedge.stageflow import StageFlow

__all__ = ["BACKENDS", "Pipeline", "check_against_manifest"]

RunnerFactory = Callable[[Manifest, str], BaseRunner]


def check_against_manifest(runner: BaseRunner, manifest: Manifest, graph: str) -> None:
    """The graph file's own inputs/outputs must be the ones the manifest lists (names, dtypes, ranks)."""
    check_graph_io(manifest, graph, list(runner.get_input_metadata().values()),
                   list(runner.get_output_metadata().values()))


VERIFY = ("fingerprint", "sha256", None)


def identity(manifest: Manifest, backend: str, options: dict, factory) -> str:
    """The export as the stage cache keys it: its directory and whole manifest (graph checksums, precision,
    engines), the backend and its loader options, a replaced runner factory."""
    parts = {"directory": str(Path(manifest.directory).resolve()), "manifest": manifest.to_dict(), "backend": backend,
             "options": options, "factory": None if factory is None else id(factory)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode("utf-8")).hexdigest()


class Pipeline(StageFlow):
    """`runner_options`: the backend's loader options for every runner (`make_runner`'s: threads, spin, ...);
    `runner_factory(manifest, graph)` replaces the backend's runners (calibration records through it); `verify`
    checks each ONNX graph against the manifest first: a fingerprint (cheap, the default), every byte (sha256, what
    validate does) or not at all (None)."""

    def _check_preprocess(self, export_dir) -> None:
        """preprocess.json agrees with the model the graphs were exported from (checked with --no-verify too: an
        image-token count the graphs do not make is a message naming the file and key, not a shape error later)."""
        from tgedge.contract import preprocess_needs

        spec, model = self.pre.spec, self.manifest.model
        want = {**preprocess_needs(model), "pad_to_square": model.get("pad_to_square", spec.pad_to_square)}
        if model.get("image_token_index") is not None:  # None: the placeholder id, whatever preprocess.json says
            want["image_token_id"] = model["image_token_index"]
        wrong = [f"{k} {getattr(spec, k)!r}, the model's is {v!r}" for k, v in want.items() if getattr(spec, k) != v]
        if wrong:
            name = self.manifest.files.get("preprocess", "preprocess.json")
            raise TgedgeError(f"{export_dir}/{name}: {'; '.join(wrong)} (manifest.json model): export again")

    def __init__(self, export_dir: str | Path, backend: str = "onnxruntime", context: int | None = None,
                 runner_factory: RunnerFactory | None = None, verify: str | None = "fingerprint",
                 stages: tuple[str, ...] | None = None, runner_options: dict | None = None):
        """`stages`: load only these of the contract's stages (text-only use: embed and decoder)."""
        self.manifest = Manifest.load(export_dir)
        longest = self.manifest.max_context
        if context is not None and context > longest:  # not clamped: the user asked for more than the graphs hold
            raise TgedgeError(f"{export_dir}: --max-context {context} is above the export's max_context {longest} "
                              f"(manifest.json): pass at most {longest}, or export again with --max-context {context}")
        if verify not in VERIFY:
            raise TgedgeError(f"unknown verify mode {verify!r} (choose from fingerprint, sha256, None)")
        self.contract = self.manifest.contract
        stages = tuple(stages or self.contract.stage_names)
        unknown = [s for s in stages if s not in self.contract.stage_names]
        if unknown:
            raise TgedgeError(f"unknown stage {unknown[0]!r} (this model's: {', '.join(self.contract.stage_names)})")
        if verify and backend != "tensorrt":  # TensorRT runs engines, checked against their own metadata
            for graph in stages:
                self.manifest.verify(graph, full=verify == "sha256")
        if verify:
            self.manifest.verify_files()
        self.pre = Preprocessor.from_dir(export_dir, self.manifest.files)
        self._check_preprocess(export_dir)
        self.backend = backend
        self.context = context or longest
        options = runner_options or {}
        self._identity_of = (backend, options, runner_factory)  # hashed on the stage cache's first use only
        self._identity: str | None = None
        factory = runner_factory or (lambda manifest, graph: make_runner(backend, manifest, graph, **options))
        self.runners: dict[str, BaseRunner] = {}
        try:
            for graph in stages:
                runner = factory(self.manifest, graph)
                runner.activate()
                self.runners[graph] = runner
                check_against_manifest(runner, self.manifest, graph)
        except BaseException:
            self.close()
            raise
        self.cache = make_cache(self.contract.cache)

    def cache_identity(self) -> str:
        """The export's identity and the preprocessing settings now (`pre` may be replaced)."""
        if self._identity is None:
            self._identity = identity(self.manifest, *self._identity_of)
        return self._identity + json.dumps(self.pre.spec.to_dict(), sort_keys=True)

    def scheduler(self, slots: int = 8, max_waiting: int = 64, thread: bool = True) -> Scheduler:
        """In-flight batching of many requests' decoding (`runtime.scheduler.Scheduler`; a static-cache export)."""
        return Scheduler(self, slots, max_waiting, thread)

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_stage(self, name: str, feed: dict[str, np.ndarray], **options) -> dict:
        """`options` for the runner's infer (the decoder's: what the KV cache asks, `keep`, `bound`)."""
        if name not in self.runners:
            raise TgedgeError(f"stage {name!r} is not loaded in this pipeline (loaded: {', '.join(self.runners)})")
        return self.runners[name].infer(feed, **options)

    # -- decode steps (tgedge.generate drives them) -----------------------------------------------------------
    def setup_cache(self, max_len: int) -> None:
        if max_len > self.manifest.max_context:
            raise TgedgeError(f"{max_len} positions exceed the export's max context ({self.manifest.max_context})")
        self.cache.reset(max_len, self.runners["decoder"])

    def clear_cache(self) -> None:
        self.cache.clear()

    def truncate_cache(self, length: int) -> None:
        """Keep the first `length` cached positions (a conversation's prefix that still holds); the next step
        writes after them."""
        self.cache.truncate(length)

    def _step(self, x: np.ndarray) -> np.ndarray:
        """One decoder call: embeddings (1, T, D) after the cached positions -> last logits (V,). The cache gives the
        rest of the feed and how the runner treats it (outputs kept on the device, buffers bound in place)."""
        t = x.shape[1]
        out = self.run_stage("decoder", {"inputs_embeds": x, **self.cache.feed(t)}, **self.cache.options)
        self.cache.update(out, t)
        return out["logits"][0, -1]

    def prefill(self, x: np.ndarray) -> np.ndarray:
        return self._step(x)

    def decode_one_token(self, token: int, pos: int) -> np.ndarray:
        if pos != self.cache.length:
            raise TgedgeError(f"decode at position {pos} but the cache holds {self.cache.length}")
        return self._step(self.embed_tokens(np.array([[token]], np.int64)))
