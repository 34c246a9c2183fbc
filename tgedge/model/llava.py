"""The whole TG-LLaVA model: vision tower, text guide, TG-FOM, TG-DP, projector, decoder.

Its methods are the runtime stages (text_guide, vision, fuse, embed, decoder) so that the exported
graphs and the reference compute the same things. Parameter names are tgedge's checkpoint layout (c).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tgedge.config import ModelConfig
from tgedge.model.decoder import Decoder
from tgedge.model.fom import FeatureOptimizationMask
from tgedge.model.perceiver import DetailPerceiver
from tgedge.model.projector import Projector
from tgedge.model.text import TextGuideEncoder
from tgedge.model.vision import VisionTower
from tgedge.preprocess import IMAGE_PLACEHOLDER_ID, split_views


class TGLlava(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg.projector)
        self.language_model = Decoder(cfg.decoder)
        if not cfg.decoder.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.decoder.hidden_size, cfg.decoder.vocab_size, bias=False)
        self.text_tower = TextGuideEncoder(cfg.text_guide) if cfg.text_guide else None
        self.mm_cross_attn = FeatureOptimizationMask(cfg.feature_mask) if cfg.feature_mask else None
        self.mm_patch_encoder = DetailPerceiver(cfg.detail_perceiver) if cfg.detail_perceiver else None

    @property
    def image_token_id(self) -> int:
        idx = self.cfg.image_token_index
        return IMAGE_PLACEHOLDER_ID if idx is None else idx

    # -- stages -------------------------------------------------------------------------------------------
    def text_guide(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP token ids (B, T) -> token features (B, T, Dt), pooled (B, Dt)."""
        return self.text_tower(ids)

    def vision(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, H, W) views -> (V, num_features, Dv); V = B for plain LLaVA, 5B with TG-DP's crops."""
        return self.vision_tower(views)

    def fuse(self, features: torch.Tensor, crop_features: torch.Tensor | None = None,
             text_tokens: torch.Tensor | None = None, text_pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Main view features (B, N, Dv) [+ crops (B, 4N, Dv), text] -> image embeddings (B, N[+L], D)."""
        if self.mm_cross_attn is not None:
            features = features + self.mm_cross_attn(text_pooled)  # F' = F + Z(M_t)
        embeds = self.multi_modal_projector(features)
        if self.mm_patch_encoder is not None:
            embeds = torch.cat([embeds, self.mm_patch_encoder(crop_features, text_tokens)], dim=1)
        return embeds

    def embed(self, ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, D), image embeddings placed at the image-token positions."""
        is_image = ids == self.image_token_id
        x = self.language_model.embed_tokens(torch.where(is_image, 0, ids))
        n = int(is_image.sum())
        if n:
            if image_embeds is None or image_embeds.shape[0] * image_embeds.shape[1] != n:
                got = "none" if image_embeds is None else tuple(image_embeds.shape)
                raise ValueError(f"{n} image-token positions but image embeddings {got}")
            x = x.masked_scatter(is_image[..., None], image_embeds.to(x.dtype))
        return x

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
        """pixels (B, 3, H, W) [+ crops (B, 4, 3, H, W), text guide ids (B, T)] -> image embeddings."""
        b = pixel_values.shape[0]
        views = pixel_values if self.mm_patch_encoder is None else torch.cat([pixel_values, crops.flatten(0, 1)])
        main, crop_feats = split_views(self.vision(views), b)
        tokens = pooled = None
        if self.text_tower is not None and self.cfg.has_tg:
            tokens, pooled = self.text_guide(guide_ids)
        return self.fuse(main, crop_feats, tokens, pooled)

    def without_tg(self, feature_mask: bool = True, detail_perceiver: bool = True) -> "TGLlava":
        """Drop TG modules in place (the ablations): the model then runs as plain LLaVA for what was dropped."""
        cfg = self.cfg
        if feature_mask:
            self.mm_cross_attn, cfg = None, dataclasses.replace(cfg, feature_mask=None)
        if detail_perceiver:
            self.mm_patch_encoder, cfg = None, dataclasses.replace(cfg, detail_perceiver=None)
        self.cfg = cfg
        return self
