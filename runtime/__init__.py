"""The lightweight, torch-free runtime: numpy, pillow, tokenizers and a backend library only.

    from tgedge.runtime import Pipeline
    with Pipeline("out/demo-fp32", backend="onnxruntime") as pipe:
        print(pipe.answer("image.png", "What colour is the circle?").text)
"""

from tgedge.contract import StageContract, TensorMeta
from tgedge.runtime.backends import BACKENDS, make_runner
from tgedge.runtime.cache import GrowingCache, KVCache
from tgedge.runtime.manifest import GRAPHS, Manifest
from tgedge.runtime.onnxrt import OnnxRuntimeRunner, SessionFromOnnx
from tgedge.runtime.pipeline import Pipeline
from tgedge.runtime.runner import BaseRunner
from tgedge.runtime.scheduler import Request, Scheduler

__all__ = ["BACKENDS", "GRAPHS", "BaseRunner", "GrowingCache", "KVCache", "Manifest", "OnnxRuntimeRunner", "Pipeline",
           "Request", "Scheduler", "SessionFromOnnx", "StageContract", "TensorMeta", "make_runner"]
