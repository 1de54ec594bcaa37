"""ExpertLayout: how many MoE layers and experts a model has, and how flat keys map to them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertLayout:
    """Keys are flat expert ids ``layer * experts_per_layer + expert`` (layer = MoE-layer ordinal)."""

    num_layers: int
    experts_per_layer: int
    top_k: int

    def __post_init__(self) -> None:
        if min(self.num_layers, self.experts_per_layer, self.top_k) < 1:
            raise ValueError(f"layout needs positive sizes, got {self}")

    @property
    def num_keys(self) -> int:
        return self.num_layers * self.experts_per_layer

    def key(self, layer: int, expert: int) -> int:
        return layer * self.experts_per_layer + expert

    def layer_of(self, key: int) -> int:
        return key // self.experts_per_layer
