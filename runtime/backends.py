"""The one list of runtime backends: a name -> the module whose `runner_for(manifest, graph, **options)` builds
that backend's runner from its loader. Modules are imported on use, so this package imports without them.

Adding a backend is one runner/loader file with a `runner_for` plus one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

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


def make_runner(backend: str, manifest, graph: str):
    """A (not yet active) runner for one graph of an export or engine directory."""
    if backend not in BACKENDS:
        raise TgedgeError(f"unknown backend {backend!r} (choose from torch, {', '.join(BACKENDS)})")
    entry = BACKENDS[backend]
    return importlib.import_module(entry.module).runner_for(manifest, graph, **entry.options)
