"""OffloadStats: per-layer counters of what the engine did."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class OffloadStats:
    """Counters per MoE layer (index = MoE-layer ordinal, not the model layer)."""

    num_layers: int
    bytes_per_expert: int
    layer_calls: np.ndarray = field(init=False)
    tokens: np.ndarray = field(init=False)          # token rows seen by the layer
    hits: np.ndarray = field(init=False)            # selected experts already resident
    misses: np.ndarray = field(init=False)          # selected experts that had to be copied
    evictions: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        for name in ("layer_calls", "tokens", "hits", "misses", "evictions"):
            setattr(self, name, np.zeros(self.num_layers, dtype=np.int64))

    @property
    def bytes_copied(self) -> np.ndarray:
        return self.misses * self.bytes_per_expert

    @property
    def hit_rate(self) -> float:
        total = int(self.hits.sum() + self.misses.sum())
        return float(self.hits.sum()) / total if total else 1.0

    def to_dict(self) -> dict:
        return {
            "hit_rate": self.hit_rate,
            "hits": int(self.hits.sum()),
            "misses": int(self.misses.sum()),
            "bytes_copied": int(self.bytes_copied.sum()),
            "per_layer": {
                "layer_calls": self.layer_calls.tolist(),
                "tokens": self.tokens.tolist(),
                "hits": self.hits.tolist(),
                "misses": self.misses.tolist(),
                "evictions": self.evictions.tolist(),
                "bytes_copied": self.bytes_copied.tolist(),
            },
        }

    def summary(self) -> str:
        gb = self.bytes_copied.sum() / 1e9
        return (
            f"hit rate {self.hit_rate:.1%} ({int(self.hits.sum())} hits, {int(self.misses.sum())} misses), "
            f"{gb:.3f} GB copied"
        )
