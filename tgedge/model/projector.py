"""LLaVA's 2-layer MLP projector from the vision width to the LLM width."""

from __future__ import annotations

import torch
from torch import nn

from tgedge.config import ProjectorConfig
from tgedge.model.common import activation


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.in_features, cfg.out_features, bias=cfg.bias)
        self.act = activation(cfg.hidden_act)
        self.linear_2 = nn.Linear(cfg.out_features, cfg.out_features, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
