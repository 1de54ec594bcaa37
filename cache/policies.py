"""Eviction policies behind one interface. Keys are flat expert ids (layer * E + expert)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class CachePolicy(ABC):
    """Bookkeeping that picks which resident expert leaves the cache.

    The cache calls ``observe`` once per router call of a layer, ``touch`` when a
    resident expert is used, ``admit`` when an expert enters, ``remove`` when one
    leaves, and ``victim`` to choose among evictable residents.
    """

    name: str = "policy"
    wants_router_probs: bool = False   # True: observe() needs the router's scores over all experts

    def observe(self, layer: int, chosen: Sequence[int], router_probs: np.ndarray | None = None) -> None:
        """Router call of MoE layer ``layer``: local ids ``chosen`` were selected."""

    @abstractmethod
    def touch(self, key: int) -> None: ...

    @abstractmethod
    def admit(self, key: int) -> None: ...

    @abstractmethod
    def remove(self, key: int) -> None: ...

    @abstractmethod
    def victim(self, candidates: Sequence[int]) -> int: ...


class LRUPolicy(CachePolicy):
    """Least recently used: evict the candidate whose last use is oldest."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def touch(self, key: int) -> None:
        self._order.move_to_end(key)

    def admit(self, key: int) -> None:
        self._order[key] = None

    def remove(self, key: int) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Sequence[int]) -> int:
        allowed = set(candidates)
        for key in self._order:
            if key in allowed:
                return key
        raise ValueError("no evictable candidate")


POLICIES = {"lru": LRUPolicy}


def make_policy(name: str, **kwargs) -> CachePolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)
