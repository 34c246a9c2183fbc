"""What the CLI modules share: backends, the epilog, opening a pipeline, atomic report writes."""

from __future__ import annotations

from tgedge.errors import TgedgeError

BACKENDS = ["torch", "onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt"]
EPILOG = "Exit codes: 0 ok, 1 a check failed, 2 bad input. Add --debug for a traceback."


def open_pipeline(model: str, backend: str | None, clip: str | None = None, context: int | None = None):
    """A checkpoint runs on torch; an export directory (it has manifest.json) on a runtime backend."""
    from pathlib import Path

    is_export = (Path(model) / "manifest.json").exists()
    backend = backend or ("onnxruntime" if is_export else "torch")
    if backend == "torch":
        if is_export:
            raise TgedgeError(f"{model} is an export directory: the torch backend runs checkpoints "
                              "(pass the checkpoint, or pick a runtime backend)")
        from tgedge.reference import TorchPipeline

        return TorchPipeline.from_checkpoint(model, clip, context)
    if not is_export:
        raise TgedgeError(f"--backend {backend} runs an export directory (with manifest.json); {model} is not one "
                          f"(make one with: tgedge export {model} -o DIR)")
    from tgedge.runtime.pipeline import Pipeline

    return Pipeline(model, backend, context)
