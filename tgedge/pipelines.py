"""Opening a model to run: a checkpoint on the PyTorch reference, an export directory on a runtime backend.

What `tgedge run`, `eval` and `bench` open; the library's, so that no library module reaches into the CLI.
"""

from __future__ import annotations

from tgedge.errors import TgedgeError
from tgedge.runtime.manifest import is_export


def open_pipeline(model: str, backend: str | None, clip: str | None = None, context: int | None = None,
                  verify: bool = True, stages: tuple[str, ...] | None = None, torch_device: str = "cpu",
                  **loader_options):
    """A checkpoint runs on torch; an export directory (it has manifest.json) on a runtime backend, its graphs
    first checked against the manifest's fingerprints unless `verify` is False. `torch_device` (cpu, cuda: fp16
    there) is the torch reference's; `stages` (only these of an export's stages) and `loader_options`
    (`make_runner`'s: threads, spin, ...) are the runtime's."""
    export = is_export(model)
    backend = backend or ("onnxruntime" if export else "torch")
    if backend == "torch":
        if export:
            raise TgedgeError(f"--backend torch runs checkpoints; {model} is an export directory (pass the "
                              "checkpoint, or pick a runtime backend)")
        from tgedge.reference import TorchPipeline

        return TorchPipeline.from_checkpoint(model, clip, context, device=torch_device)
    if torch_device != "cpu":
        raise TgedgeError(f"a torch device ({torch_device}) is for the torch backend; --backend {backend} chooses "
                          "its own device")
    if not export:
        raise TgedgeError(f"--backend {backend} runs an export directory (with manifest.json); {model} is not one "
                          f"(make one with: tgedge export {model} -o DIR)")
    if clip is not None:  # an export carries its towers' graphs: a CLIP directory would change nothing
        raise TgedgeError(f"--clip is for original-layout checkpoints; {model} is an export directory, whose graphs "
                          "hold the towers: leave it out")
    from tgedge.runtime.pipeline import Pipeline

    return Pipeline(model, backend, context, verify="fingerprint" if verify else None, stages=stages,
                    runner_options=loader_options)
