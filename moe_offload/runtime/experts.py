"""OffloadedExperts: drop-in replacement for transformers' *Experts modules."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .engine import Engine


class OffloadedExperts(nn.Module):
    """Holds no weights; hands each call to the engine.

    Called exactly as transformers calls its experts module:
    ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.
    """

    def __init__(self, engine: Engine, layer: int, model_layer: int, num_experts: int,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.engine = engine
        self.layer = layer               # MoE-layer ordinal (expert key space)
        self.model_layer = model_layer   # index in model.layers
        self.num_experts = num_experts
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.engine.run_layer(self.layer, hidden_states, top_k_index, top_k_weights, self.act_fn)

    def extra_repr(self) -> str:
        return f"layer={self.model_layer}, num_experts={self.num_experts}, offloaded"
