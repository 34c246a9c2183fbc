"""The one list of runtime backends: a name -> the module whose `runner_for(manifest, graph, **options)` builds
that backend's runner from its loader. Modules are imported on use, so this package imports without them.

Adding a backend is one runner/loader file with a `runner_for` plus one line here. `make_runner` is the only door to
a runner: the backend's own options (onnxruntime's device) come from this table, the caller's loader options
(threads, spin, in_order, ...) are passed on.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from tgedge.errors import TgedgeError


@dataclass(frozen=True)
class Backend:
    name: str
    module: str
    options: dict = field(default_factory=dict)
    help: str = ""


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("onnxruntime", "tgedge.runtime.onnxrt", {"device": "cpu"}, "onnxruntime CPU"),
    Backend("onnxruntime-cuda", "tgedge.runtime.onnxrt", {"device": "cuda"}, "onnxruntime CUDA execution provider"),
    Backend("onnxruntime-trt", "tgedge.runtime.onnxrt", {"device": "trt"}, "onnxruntime TensorRT execution provider"),
    Backend("tensorrt", "tgedge.runtime.tensorrt", {}, "TensorRT engines built by tgedge build"),
)}


def make_runner(backend: str, manifest, graph: str, **loader_options):
    """A (not yet active) runner for one graph of an export or engine directory. `loader_options` go to the
    backend's loader: `threads` (intra-op threads, 0: the library's default), `spin` (idle threads spin),
    `in_order` and `rewrite` (onnxruntime's SessionFromOnnx); a host-thread setting a GPU backend has no use for
    is taken and ignored there, so that one setting (bench --threads, a served model's threads) fits every backend."""
    if backend not in BACKENDS:
        raise TgedgeError(f"unknown backend {backend!r} (choose from torch, {', '.join(BACKENDS)})")
    entry = BACKENDS[backend]
    return importlib.import_module(entry.module).runner_for(manifest, graph, **entry.options, **loader_options)


@dataclass(frozen=True)
class GraphFile:
    """One graph file standing where `make_runner` takes a manifest (a Triton stage model's `model.onnx`, which has
    no manifest beside it): its `graph_path` is that file whatever the graph's name."""
    path: Path

    def graph_path(self, graph: str) -> Path:
        return Path(self.path)
