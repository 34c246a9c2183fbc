"""Gated cross-modal fusion (`gated`, the Open-AutoGLM design): the main view's patch features attend to the
question's text-tower tokens, and a learned gate mixes that text context into each patch.

    x = F                                              # (B, N, Dv) patch features of the main view: the queries
    K times:  x = x + CrossAttention(LN(x), LN_t(E_t))  # keys/values: the text guide's token features (B, T, Dt)
              x = x + FFN(LN(x))
    h_text, h_image = x, F
    adaptive_gating:    g = sigmoid(W_g [h_text, h_image] + b_g)            (B, N, Dv)
                        h = g * h_text + (1 - g) * h_image
    attention_weights:  (a_v, a_t) = softmax(W_a tanh(W_v h_image + W_t h_text + b))   (B, N, 2)
                        h = a_v * h_image + a_t * h_text
    image_embeds = projector(h)                         # (B, N, D): one token per patch, the decoder side as LLaVA's

Initialisation: the last linear layer of every residual branch (`cross_attn.out_proj`, `ffn.fc2`) starts at zero, so
`h_text = h_image` and an untrained model is exactly plain LLaVA whatever the gate says (TG-FOM's zero_layer idea).
The gate starts neutral (W_g = 0, b_g = 0: g = 1/2; W_a = 0: a = (1/2, 1/2)) rather than closed: a gate that starts
near 0 would scale the gradient reaching the text branches by g, and the text context could not grow within a
short budget. The gate learns as soon as the text context differs from the image.

Text padding: inference feeds the text guide unpadded, batch 1 (the `text_guide` stage's output as it is, like
TG-DP), so the exported graph has no mask input. Training pads the guide with id 0 in a batch and passes
`text_mask` (B, T), so that padded keys get no attention weight: the numbers of the unpadded batch-1 path.

Ablations at inference (`GatedFusion.ablate`): `gate` forces g = 0 (a = (1, 0)), i.e. image only, which is exactly
plain LLaVA with the same vision tower, projector and decoder; `text` drops the cross-attention sub-layers, so no
question information reaches the patches (the FFNs and the gate still run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgedge.config import GatedFusionConfig
from tgedge.errors import TgedgeError
from tgedge.model.common import MultiHeadAttention, at_least_fp32
from tgedge.model.text import TextGuideEncoder


class CrossAttention(MultiHeadAttention):
    """Patches (queries, width Dv) attend to text tokens (keys/values from width Dt); CLIP's projection names."""

    def __init__(self, dim: int, text_dim: int, num_heads: int):
        super().__init__(dim, text_dim, num_heads, ("q_proj", "k_proj", "v_proj", "out_proj"))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class FusionLayer(nn.Module):
    """Pre-norm cross-attention to the text, then an FFN, each a residual branch."""

    def __init__(self, cfg: GatedFusionConfig):
        super().__init__()
        d, eps = cfg.vision_width, cfg.layer_norm_eps
        self.norm_image = nn.LayerNorm(d, eps=eps)
        self.norm_text = nn.LayerNorm(cfg.text_width, eps=eps)
        self.cross_attn = CrossAttention(d, cfg.text_width, cfg.num_heads)
        self.norm_ffn = nn.LayerNorm(d, eps=eps)
        self.ffn = FeedForward(d, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None, use_text: bool) -> torch.Tensor:
        if use_text:
            x = x + self.cross_attn(self.norm_image(x), self.norm_text(text), mask)
        return x + self.ffn(self.norm_ffn(x))


class AdaptiveGate(nn.Module):
    """g = sigmoid(W_g [h_text, h_image] + b_g), per patch and channel; h = g h_text + (1 - g) h_image."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h_text: torch.Tensor, h_image: torch.Tensor, image_only: bool = False) -> torch.Tensor:
        g = torch.sigmoid(self.proj(torch.cat([h_text, h_image], dim=-1)))  # (B, N, D)
        if image_only:
            g = torch.zeros_like(g)
        return g * h_text + (1 - g) * h_image


class ModalityAttention(nn.Module):
    """(a_v, a_t) = softmax(W_a tanh(W_v v + W_t t + b)) per patch; h = a_v v + a_t t."""

    def __init__(self, dim: int):
        super().__init__()
        self.image_proj = nn.Linear(dim, dim)  # W_v, and b
        self.text_proj = nn.Linear(dim, dim, bias=False)  # W_t
        self.score = nn.Linear(dim, 2, bias=False)  # W_a: image, text
        nn.init.zeros_(self.score.weight)

    def forward(self, h_text: torch.Tensor, h_image: torch.Tensor, image_only: bool = False) -> torch.Tensor:
        scores = self.score(torch.tanh(self.image_proj(h_image) + self.text_proj(h_text)))  # (B, N, 2)
        alpha = torch.softmax(at_least_fp32(scores), dim=-1).to(h_image.dtype)
        if image_only:
            alpha = torch.cat([torch.ones_like(alpha[..., :1]), torch.zeros_like(alpha[..., 1:])], dim=-1)
        return alpha[..., :1] * h_image + alpha[..., 1:] * h_text


GATES = {"adaptive_gating": AdaptiveGate, "attention_weights": ModalityAttention}


class GatedCrossModalFusion(nn.Module):
    """Image patch features + text token features -> fused patch features (before the projector)."""

    ABLATIONS = ("gate", "text")

    def __init__(self, cfg: GatedFusionConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(FusionLayer(cfg) for _ in range(cfg.num_layers))
        self.gate = GATES[cfg.strategy](cfg.vision_width)
        self.ablation: str | None = None  # an inference ablation (not saved): "gate" (g = 0) or "text"
        for layer in self.layers:  # residual branches start at zero: h_text = h_image, the model is plain LLaVA
            for last in (layer.cross_attn.out_proj, layer.ffn.fc2):
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """image (B, N, Dv), text (B, T, Dt) [, text_mask (B, T) true where a token is real] -> (B, N, Dv)."""
        mask = None
        if text_mask is not None:  # training batches only: padded keys get no weight
            mask = torch.where(text_mask, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]  # (B,1,1,T)
        x = image_features
        for layer in self.layers:
            x = layer(x, text_features, mask, use_text=self.ablation != "text")
        return self.gate(x, image_features, image_only=self.ablation == "gate")


class GatedFusion:
    """The `gated` family: modules `text_tower` (the CLIP text guide) and `mm_gated_fusion` on the model."""

    ABLATIONS = GatedCrossModalFusion.ABLATIONS

    @staticmethod
    def build(model, cfg) -> None:
        model.text_tower = TextGuideEncoder(cfg.text_guide)
        model.mm_gated_fusion = GatedCrossModalFusion(cfg.gated_fusion)

    @staticmethod
    def fuse(model, image_features, text_features, text_mask=None) -> torch.Tensor:
        """Main view (B, N, Dv), text tokens (B, T, Dt) [, training's text_mask (B, T)] -> (B, N, D)."""
        return model.multi_modal_projector(model.mm_gated_fusion(image_features, text_features, text_mask))

    @staticmethod
    def ablate(model, which: str | None) -> None:
        """Switch part of the fusion off at inference: `gate` (g = 0, image only), `text` (no cross-attention);
        None restores it."""
        if getattr(model, "mm_gated_fusion", None) is None:
            raise TgedgeError("this model has no gated fusion to ablate")
        if which is not None and which not in GatedFusion.ABLATIONS:
            raise TgedgeError(f"unknown gated fusion ablation {which!r} "
                              f"(choose from {', '.join(GatedFusion.ABLATIONS)})")
        model.mm_gated_fusion.ablation = which
