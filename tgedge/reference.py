"""The PyTorch reference pipeline: preprocess -> text guide -> vision -> fusion -> prefill -> decode.

On the CPU in fp32 (the reference every export is judged against); `device="cuda"` runs it on a CUDA device, in fp16
unless told otherwise (torch eager, what the bench compares the runtime with there). Stages take and give numpy
(fp32) either way: the tensors go to the device and come back once per stage, and once per decode step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tgedge.contract import StageContract
from tgedge.errors import TgedgeError
from tgedge.generate import Answer
from tgedge.preprocess import Inputs, Preprocessor
from tgedge.stageflow import StageFlow

__all__ = ["Answer", "TORCH_DEVICES", "TorchPipeline", "torch_device"]

TORCH_DEVICES = ("cpu", "cuda")
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "fp16"}  # precision names (tgedge.precision): the reference's, torch eager's


def torch_device(device: str, dtype: str | None = None) -> tuple[str, torch.dtype]:
    """(device, torch dtype) for the reference on `device` (`cpu`, `cuda`) in `dtype` (a float precision name,
    default fp32 on the CPU, fp16 on CUDA); a device torch cannot use is a user error, found before any loading."""
    from tgedge.precision import FLOAT, PRECISIONS

    if device not in TORCH_DEVICES:
        raise TgedgeError(f"torch device {device!r}: choose from {', '.join(TORCH_DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TgedgeError(f"torch device cuda: this torch ({torch.__version__}) sees no CUDA device "
                          f"({'no CUDA build' if torch.version.cuda is None else 'none visible'})")
    name = dtype or DEFAULT_DTYPE[device]
    precision = PRECISIONS.get(name)
    if precision is None or precision.form != FLOAT:
        floats = [p.name for p in PRECISIONS.values() if p.form == FLOAT]
        raise TgedgeError(f"torch dtype {name!r}: choose from {', '.join(floats)}")
    return device, getattr(torch, precision.float_dtype)


class TorchPipeline(StageFlow):
    """The model's stages with numpy in and out (the stage flow is the runtime's), and its own KV cache."""

    cached = 0  # positions in the KV cache

    def __init__(self, model, preprocessor: Preprocessor, context: int | None = None):
        self.model, self.pre = model.eval(), preprocessor
        self.context = context or model.cfg.decoder.max_position_embeddings

    @property
    def contract(self) -> StageContract:
        return self.model.contract

    def cache_identity(self) -> str:
        """This model object as it is now (dtype and device read live, ablations counted) and its preprocessing."""
        import json

        return json.dumps([id(self.model), str(self.dtype), str(self.device), getattr(self, "_ablations", ()),
                           self.pre.spec.to_dict()], sort_keys=True)

    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's float dtype now (read live: tgedge.noise turns modules to float64 and back)."""
        return self.model.language_model.embed_tokens.weight.dtype

    def to_model(self, v) -> torch.Tensor:
        """A numpy array or tensor -> on the model's device; floats in the model's dtype."""
        t = torch.as_tensor(v)
        return t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)

    @staticmethod
    def to_numpy(t: torch.Tensor) -> np.ndarray:
        """Back to the host: half floats as fp32 (what every pipeline gives), the rest as they are."""
        return (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).cpu().numpy()

    @torch.no_grad()
    def run_stage(self, name: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.model.run_stage(name, {k: self.to_model(v) for k, v in feed.items()})
        return {k: self.to_numpy(v) for k, v in out.items()}

    @classmethod
    def from_checkpoint(cls, path: str | Path, clip: str | Path | None = None, context: int | None = None,
                        device: str = "cpu", dtype: str | None = None):
        """`device`, `dtype`: `torch_device`'s (default: the CPU, fp32)."""
        from tgedge.checkpoint import load_model

        device, torch_dtype = torch_device(device, dtype)
        model, ckpt = load_model(path, clip, device, torch_dtype)
        return cls(model, ckpt.preprocessor, context)

    @torch.no_grad()
    def ablate(self, which: str) -> "TorchPipeline":
        """Switch part of the fusion off at inference, as the family that declares `which` does it (`tg`: `fom`
        zeroes TG-FOM's zero_layer, `dp` drops TG-DP's tokens, `both`; `gated`: `gate` forces g = 0, `text` removes
        the text context); the preprocessing follows the model's config after it."""
        from tgedge.contract import FAMILIES, ablation_choices, preprocess_needs
        from tgedge.errors import TgedgeError
        from tgedge.model.llava import family_class

        owner = next((f for f in FAMILIES.values() if which in f.ablations), None)
        if owner is None:
            raise TgedgeError(f"unknown ablation {which!r} (choose from {', '.join(ablation_choices())})")
        family_class(owner).ablate(self.model, which)  # refuses a model without the family's modules
        self._ablations = (*getattr(self, "_ablations", ()), which)  # another model now: no cached output of before
        self.pre = self.pre.replace(**preprocess_needs(self.model.cfg.to_dict()))
        return self

    def embeddings(self, inputs: Inputs) -> torch.Tensor:
        """Prompt embeddings (1, T, D) with the image (and TG-DP detail) tokens in place, as a torch tensor."""
        return torch.from_numpy(super().embeddings(inputs))

    # -- decode steps (tgedge.generate drives them) -----------------------------------------------------------
    def setup_cache(self, max_len: int) -> None:
        self.model.language_model.setup_cache(1, max_len)
        self.cached = 0

    def clear_cache(self) -> None:
        self.model.language_model.clear_cache()
        self.cached = 0

    def truncate_cache(self, length: int) -> None:
        """Keep the first `length` cached positions; the next prefill writes after them (the rest is masked)."""
        if not 0 <= length <= self.cached:
            raise TgedgeError(f"cannot keep {length} positions of a cache holding {self.cached}")
        self.cached = length

    @torch.no_grad()
    def prefill(self, x):
        """Prompt embeddings (1, T, D) after the cached positions -> last logits (V,) as numpy; fills the KV cache."""
        x = self.to_model(x)
        start = self.cached if self.model.language_model.max_seq_len else 0  # no cache set up: x alone
        self.cached = start + x.shape[1]
        return self.to_numpy(self.model(x, torch.arange(start, self.cached, device=self.device))[0, -1])

    @torch.no_grad()
    def decode_one_token(self, token: int, pos: int):
        """A generated id is always text, even the image token's id: it goes through the embedding table."""
        x = self.model.language_model.embed_tokens(torch.tensor([[token]], device=self.device))
        self.cached = pos + 1
        return self.to_numpy(self.model(x, torch.tensor([pos], device=self.device))[0, -1])
