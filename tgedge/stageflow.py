"""The stage flow every pipeline shares: views -> vision -> text guide -> fusion -> embed, by the stage contract.

A pipeline provides `run_stage(name, feed) -> outputs` (named tensors in and out, the contract's names) and
`contract`; `StageFlow` strings the stages together the same way for the PyTorch reference (`TorchPipeline`)
and the torch-free runtime (`runtime.Pipeline`), so that `tgedge validate` can feed one side's stage the other
side's inputs and compare like with like. `encode_image` also serves training (torch tensors, with gradients).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from tgedge.contract import StageContract
from tgedge.errors import TgedgeError
from tgedge.generate import AnswerMixin
from tgedge.preprocess import Inputs
from tgedge.stagecache import StageCache

RunStage = Callable[[str, dict[str, Any]], dict[str, Any]]

def stack_views(pixel_values, crops):
    """(B, 3, H, W) [+ crops (B, 4, 3, H, W)] -> the vision tower's batch of views (B [+ 4B], 3, H, W).

    numpy arrays (inference) or torch tensors (the reference model in training, with gradients) alike."""
    if crops is None:
        return pixel_values
    flat = crops.reshape(-1, *crops.shape[2:])
    if isinstance(pixel_values, np.ndarray):
        return np.concatenate([pixel_values, flat])
    import torch

    return torch.cat([pixel_values, flat])


def split_views(features, batch: int):
    """The vision tower's (V, N, D) output -> main (B, N, D), crops (B, 4N, D) in TL, TR, BL, BR order or None.

    Slicing and reshape only, so it serves numpy arrays (runtime) and torch tensors (reference) alike."""
    main = features[:batch]
    if features.shape[0] == batch:
        return main, None
    return main, features[batch:].reshape(batch, 4 * features.shape[1], features.shape[2])


def embed(run_stage: RunStage, ids, image_token_id: int, image_embeds=None):
    """Token ids (B, T) -> embeddings (B, T, D), image embeddings (B, N, D) placed at the image-token positions.

    numpy arrays (the pipelines) or torch tensors (training, with gradients) alike: the image token's own id is
    never looked up (it may lie outside the table), and boolean indexing places the embeddings in both."""
    is_image = ids == image_token_id
    x = run_stage("embed", {"input_ids": ids * ~is_image})["inputs_embeds"]
    n = int(is_image.sum())
    if n:
        if image_embeds is None or image_embeds.shape[0] * image_embeds.shape[1] != n:
            got = "none" if image_embeds is None else tuple(image_embeds.shape)
            raise TgedgeError(f"{n} image-token positions but image embeddings {got}")
        x[is_image] = image_embeds.reshape(n, -1)
    return x


def encode_image(run_stage: RunStage, contract: StageContract, pixel_values, crops=None, guide_ids=None):
    """pixels (B, 3, H, W) [+ crops (B, 4, 3, H, W), text guide ids (B, T)] -> image embeddings (B, N, D)."""
    features = run_stage("vision", {"pixel_values": stack_views(pixel_values, crops)})["image_features"]
    main, crop_features = split_views(features, pixel_values.shape[0])
    named = {"image_features": main, "crop_features": crop_features}
    if contract.has("text_guide"):
        named.update(run_stage("text_guide", {"input_ids": guide_ids}))
    return run_stage("fusion", {n: named[n] for n in contract.stages["fusion"].input_names})["image_embeds"]


class StageFlow(AnswerMixin):
    """Inference through the stages (numpy between them): needs `contract`, `pre`, `run_stage` and the decode
    steps of `tgedge.generate`."""

    contract: StageContract
    stage_cache: StageCache | None = None  # off unless `use_stage_cache` (chat turns it on, run leaves it off)

    def run_stage(self, name: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def cache_identity(self) -> str:
        """What, besides a stage's inputs, its outputs are a function of (the graphs, backend, settings)."""
        raise NotImplementedError

    def use_stage_cache(self, cache: StageCache | None) -> "StageFlow":
        """Take the family's question-independent stage outputs from `cache` (None: run every stage)."""
        self.stage_cache = cache
        return self

    def encode_image(self, pixel_values: np.ndarray, crops: np.ndarray | None = None,
                     guide_ids: np.ndarray | None = None) -> np.ndarray:
        run = self.run_stage
        if self.stage_cache is not None:
            run = self.stage_cache.wrap(run, self.cache_identity(), self.contract.fusion_family.question_independent)
        return encode_image(run, self.contract, pixel_values, crops, guide_ids)

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Token ids (1, T) -> embeddings (1, T, D), every id a text token (a generated id is always text)."""
        return self.run_stage("embed", {"input_ids": ids})["inputs_embeds"]

    def embed(self, ids: np.ndarray, image_embeds: np.ndarray | None = None) -> np.ndarray:
        """Token ids (1, T) -> embeddings (1, T, D), image embeddings placed at the image-token positions."""
        return embed(self.run_stage, ids, self.pre.spec.image_token_id, image_embeds)

    def embeddings(self, inputs: Inputs) -> np.ndarray:
        """Prompt embeddings (1, T, D) with the image (and detail) tokens in place: each image through its own
        views and fusion, guided by the question, its tokens at its image place in order; a text-only prompt's
        tokens alone."""
        if inputs.pixel_values is None:
            return self.embed_tokens(inputs.input_ids)
        crops = inputs.crops
        per_image = [self.encode_image(inputs.pixel_values[i:i + 1], None if crops is None else crops[i:i + 1],
                                       inputs.guide_ids) for i in range(inputs.pixel_values.shape[0])]
        return self.embed(inputs.input_ids, per_image[0] if len(per_image) == 1 else np.concatenate(per_image))
