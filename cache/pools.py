"""SlotPools: how the expert slots are partitioned between MoE layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotPools:
    """One shared pool for every key, or one pool per MoE layer with a quota of slots.

    A key's pool is 0 when shared, else its layer (``key // experts_per_layer``).
    A pool at capacity evicts among its own residents.
    """

    capacity: tuple[int, ...]      # slots of each pool
    experts_per_layer: int = 0     # 0: one shared pool

    def __post_init__(self) -> None:
        if not self.capacity or min(self.capacity) < 1:
            raise ValueError(f"every pool needs at least one slot, got capacities {self.capacity}")
        if self.experts_per_layer == 0 and len(self.capacity) != 1:
            raise ValueError("a shared pool has exactly one capacity")

    @classmethod
    def shared(cls, num_slots: int) -> "SlotPools":
        return cls((int(num_slots),))

    @classmethod
    def per_layer(cls, quotas: Sequence[int], experts_per_layer: int) -> "SlotPools":
        return cls(tuple(int(q) for q in quotas), int(experts_per_layer))

    @property
    def num_pools(self) -> int:
        return len(self.capacity)

    @property
    def num_slots(self) -> int:
        return sum(self.capacity)

    @property
    def is_shared(self) -> bool:
        return self.experts_per_layer == 0

    def pool_of(self, key: int) -> int:
        return key // self.experts_per_layer if self.experts_per_layer else 0
