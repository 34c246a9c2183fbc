"""The whole TG-LLaVA model: vision tower, text guide, fusion (its family's modules), projector, decoder.

Its methods are the stages of the stage contract (`tgedge.contract`): text_guide, vision, fuse, embed_ids and
the decoder, with the contract's tensor names as their argument names, so that the exported graphs, the
reference pipeline and training compute the same things. Parameter names are tgedge's checkpoint layout (c).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from tgedge.config import ModelConfig
from tgedge.contract import FusionFamily, StageContract
from tgedge.model.decoder import Decoder
from tgedge.model.projector import Projector
from tgedge.model.vision import VisionTower
from tgedge.preprocess import IMAGE_PLACEHOLDER_ID
from tgedge.stageflow import embed, encode_image

# contract stage -> the model method that computes it (its arguments are the stage's input names)
STAGE_METHODS = {"text_guide": "text_guide", "vision": "vision", "fusion": "fuse", "embed": "embed_ids"}


def fusion_model(contract: StageContract):
    """The torch implementation of a contract's fusion family (`module:Class` in its registry entry)."""
    return family_class(contract.fusion_family)


def family_class(family: FusionFamily):
    """A fusion family's torch implementation, imported from its entry's `module:Class`."""
    module, _, name = family.model.partition(":")
    return getattr(importlib.import_module(module), name)


class TGLlava(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg.projector)
        self.language_model = Decoder(cfg.decoder)
        if not cfg.decoder.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.decoder.hidden_size, cfg.decoder.vocab_size, bias=False)
        fusion_model(self.contract).build(self, cfg)  # the family's modules, under its checkpoints' names

    @property
    def contract(self) -> StageContract:
        """The stage contract of the model as it is now (an ablation changes it), at its max positions."""
        cached = self.__dict__.get("_contract")
        if cached is None or cached[0] is not self.cfg:
            contract = StageContract.from_config(self.cfg.to_dict(), self.cfg.decoder.max_position_embeddings)
            self.__dict__["_contract"] = cached = (self.cfg, contract)
        return cached[1]

    @property
    def image_token_id(self) -> int:
        idx = self.cfg.image_token_index
        return IMAGE_PLACEHOLDER_ID if idx is None else idx

    # -- stages -------------------------------------------------------------------------------------------
    def text_guide(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP token ids (B, T) -> token features (B, T, Dt), pooled (B, Dt)."""
        return self.text_tower(input_ids)

    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(V, 3, H, W) views -> (V, num_features, Dv); V = B for plain LLaVA, 5B with TG-DP's crops."""
        return self.vision_tower(pixel_values)

    def fuse(self, image_features: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Main view features (B, N, Dv) and the family's other fusion inputs -> image embeddings (B, N[+L], D)."""
        return fusion_model(self.contract).fuse(self, image_features, **inputs)

    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, D), every id a text token (the `embed` stage)."""
        return self.language_model.embed_tokens(input_ids)

    def stage_prefixes(self, name: str) -> tuple[str, ...]:
        """The parameters (module paths) a stage computes with: what export loads for that stage's graph alone."""
        own = {"text_guide": ("text_tower.",), "vision": ("vision_tower.",), "embed": ("language_model.embed_tokens.",),
               "decoder": ("language_model.", "lm_head.")}
        if name != "fusion":
            return own[name]
        others = {"text_tower", "vision_tower", "language_model", "lm_head"}  # fusion: the projector and the family's
        return tuple(f"{n}." for n, m in self.named_children() if n not in others and m is not None)

    def run_stage(self, name: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One stage of the contract, named tensors in and out."""
        out = getattr(self, STAGE_METHODS[name])(**feed)
        return dict(zip(self.contract.stages[name].output_names, out if isinstance(out, tuple) else (out,)))

    def embed(self, ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, D), image embeddings placed at the image-token positions (training;
        the pipelines place them the same way, `tgedge.stageflow.embed`)."""
        return embed(self.run_stage, ids, self.image_token_id, image_embeds)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, T, D) at positions input_pos (T,) -> logits (B, T, V)."""
        return self.lm_logits(self.language_model(x, input_pos))

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, D) -> logits (B, T, V)."""
        if self.cfg.decoder.tie_word_embeddings:
            return h @ self.language_model.embed_tokens.weight.T
        return self.lm_head(h)

    # -- conveniences ---------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor, crops: torch.Tensor | None = None,
                     guide_ids: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (B, 3, H, W) [+ crops (B, 4, 3, H, W), text guide ids (B, T)] -> image embeddings (training)."""
        return encode_image(self.run_stage, self.contract, pixel_values, crops, guide_ids)

    def without_tg(self, feature_mask: bool = True, detail_perceiver: bool = True) -> "TGLlava":
        """Drop TG modules in place (the ablations): the model then runs as plain LLaVA for what was dropped."""
        from tgedge.model.fusion_tg import without_tg

        return without_tg(self, feature_mask, detail_perceiver)
