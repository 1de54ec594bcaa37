"""LRUPolicy: evict the least recently used expert."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from .base import CachePolicy
from .layout import ExpertLayout


class LRUPolicy(CachePolicy):
    """Least recently used: evict the candidate whose last use is oldest."""

    name = "lru"

    def __init__(self, layout: ExpertLayout | None = None) -> None:
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
