"""The PyTorch reference pipeline: preprocess -> text guide -> vision -> fusion -> prefill -> decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tgedge.contract import StageContract
from tgedge.generate import Answer
from tgedge.preprocess import Inputs, Preprocessor
from tgedge.stageflow import StageFlow

__all__ = ["Answer", "TorchPipeline"]


class TorchPipeline(StageFlow):
    """The model's stages with numpy in and out (the stage flow is the runtime's), and its own KV cache."""

    def __init__(self, model, preprocessor: Preprocessor, context: int | None = None):
        self.model, self.pre = model.eval(), preprocessor
        self.context = context or model.cfg.decoder.max_position_embeddings

    @property
    def contract(self) -> StageContract:
        return self.model.contract

    @torch.no_grad()
    def run_stage(self, name: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.model.run_stage(name, {k: torch.from_numpy(v) for k, v in feed.items()})
        return {k: v.numpy() for k, v in out.items()}

    @classmethod
    def from_checkpoint(cls, path: str | Path, clip: str | Path | None = None, context: int | None = None):
        from tgedge.checkpoint import load_model

        model, ckpt = load_model(path, clip)
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
        self.pre = self.pre.replace(**preprocess_needs(self.model.cfg.to_dict()))
        return self

    def embeddings(self, inputs: Inputs) -> torch.Tensor:
        """Prompt embeddings (1, T, D) with the image (and TG-DP detail) tokens in place, as a torch tensor."""
        return torch.from_numpy(super().embeddings(inputs))

    # -- decode steps (tgedge.generate drives them) -----------------------------------------------------------
    def setup_cache(self, max_len: int) -> None:
        self.model.language_model.setup_cache(1, max_len)

    def clear_cache(self) -> None:
        self.model.language_model.clear_cache()

    @torch.no_grad()
    def prefill(self, x):
        """Prompt embeddings (1, T, D) -> last logits (V,) as numpy; fills the KV cache."""
        x = torch.as_tensor(x)
        return self.model(x, torch.arange(x.shape[1]))[0, -1].numpy()

    @torch.no_grad()
    def decode_one_token(self, token: int, pos: int):
        """A generated id is always text, even the image token's id: it goes through the embedding table."""
        x = self.model.language_model.embed_tokens(torch.tensor([[token]]))
        return self.model(x, torch.tensor([pos]))[0, -1].numpy()
