"""The lightweight, torch-free runtime: numpy, pillow, tokenizers and a backend library only.

    from tgedge.runtime import Pipeline
    with Pipeline("out/demo-fp32", backend="onnxruntime") as pipe:
        print(pipe.answer("image.png", "What colour is the circle?").text)
"""

from tgedge.runtime.manifest import GRAPHS, Manifest, TensorMeta
from tgedge.runtime.onnxrt import OnnxRuntimeRunner, SessionFromOnnx
from tgedge.runtime.pipeline import BACKENDS, Pipeline
from tgedge.runtime.runner import BaseRunner

__all__ = ["BACKENDS", "GRAPHS", "BaseRunner", "Manifest", "OnnxRuntimeRunner", "Pipeline", "SessionFromOnnx",
           "TensorMeta"]
