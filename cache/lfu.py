"""LFUPolicy: evict the least frequently used expert."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import CachePolicy
from .layout import ExpertLayout


class LFUPolicy(CachePolicy):
    """Least frequently used, counting every router call that used an expert.

    Counts survive eviction ("perfect" LFU: an expert that comes back keeps its
    history), so the policy converges on the most popular experts of a stable
    routing distribution. Ties go to the least recently used candidate.
    """

    name = "lfu"
    needs_layout = True

    def __init__(self, layout: ExpertLayout) -> None:
        self._uses = np.zeros(layout.num_keys, dtype=np.int64)   # [K] router calls that used each key
        self._last = np.zeros(layout.num_keys, dtype=np.int64)   # [K] clock of the latest use or admission
        self._clock = 0

    def touch(self, key: int) -> None:
        self._clock += 1
        self._uses[key] += 1
        self._last[key] = self._clock

    def admit(self, key: int) -> None:
        self._clock += 1
        self._last[key] = self._clock

    def remove(self, key: int) -> None:
        pass  # counts are kept

    def victim(self, candidates: Sequence[int]) -> int:
        keys = np.fromiter(candidates, dtype=np.int64)           # [C]
        uses = self._uses[keys]
        rarest = keys[uses == uses.min()]
        return int(rarest[self._last[rarest].argmin()])
