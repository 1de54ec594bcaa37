"""CachePolicy: the interface every eviction policy implements. Keys are flat expert ids."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from .pools import SlotPools


class CachePolicy(ABC):
    """Bookkeeping that picks which resident expert leaves the cache.

    Call order, per router call of a layer (the engine and the simulator both
    follow it): ``observe`` once with the selected local ids (and the router's
    scores [T, E] when ``wants_router_probs``); for each miss ``on_miss`` then,
    when its pool is full, ``victim`` among the evictable residents and
    ``remove`` of the one chosen, then ``admit``; ``touch`` once for every
    selected expert after it ran. ``bind_pools`` is called once by the cache,
    ``hint`` by whoever predicts a layer's experts before its router runs.
    """

    name: str = "policy"
    wants_router_probs: bool = False   # True: observe() needs the router's scores over all experts
    uses_hints: bool = False           # True: hint() changes what the policy evicts
    needs_layout: bool = False         # True: built from the model's ExpertLayout (cache.make_policy checks)
    needs_future: bool = False         # True: needs the future routing, so only the simulator builds it

    def bind_pools(self, pools: SlotPools) -> None:
        """The partition of the slots this policy serves (capacity-aware policies size their state)."""

    def observe(self, layer: int, chosen: Sequence[int], router_probs: np.ndarray | None = None) -> None:
        """Router call of MoE layer ``layer``: local ids ``chosen`` were selected; ``router_probs`` [T, E]."""

    def hint(self, layer: int, scores: np.ndarray) -> None:
        """Predicted scores [E] for layer ``layer``'s next router call; ignored unless a policy uses them."""

    def on_miss(self, key: int) -> None:
        """``key`` is not resident and is about to be loaded (called before any victim is chosen for it)."""

    @abstractmethod
    def touch(self, key: int) -> None:
        """Resident ``key`` was used (once per router call that selected it)."""

    @abstractmethod
    def admit(self, key: int) -> None:
        """``key`` took a slot."""

    @abstractmethod
    def remove(self, key: int) -> None:
        """``key`` left its slot."""

    @abstractmethod
    def victim(self, candidates: Sequence[int]) -> int:
        """One of ``candidates`` (evictable residents of one pool, never empty) to evict."""
