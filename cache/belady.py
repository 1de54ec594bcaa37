"""BeladyPolicy: the offline optimum (Belady's MIN), for simulation only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import CachePolicy
from .layout import ExpertLayout

NEVER = np.iinfo(np.int64).max


class BeladyPolicy(CachePolicy):
    """Evict the candidate whose next use is furthest in the future (never used again first).

    ``future`` holds the keys of every router call in the order the cache will
    see them (one entry per call). The clock is the index of the current call:
    ``advance()`` moves it on, and ``observe()`` calls it, so a replay that
    observes every call keeps the clock in step. Ties (e.g. several never used
    again) go to the smallest key. With demand loading and the current call's
    experts locked this is the minimum number of misses for a pool.
    """

    name = "belady"
    needs_layout = True
    needs_future = True

    def __init__(self, layout: ExpertLayout, future: Sequence[Sequence[int]]) -> None:
        lengths = np.fromiter((len(keys) for keys in future), dtype=np.int64, count=len(future))
        steps = np.repeat(np.arange(len(future), dtype=np.int64), lengths)               # [A] call of each access
        keys = np.fromiter((k for call in future for k in call), dtype=np.int64, count=int(lengths.sum()))  # [A]
        order = np.lexsort((steps, keys))                                                # by key, then time
        self._steps = steps[order]                                                       # [A]
        counts = np.bincount(keys, minlength=layout.num_keys)
        self._end = np.cumsum(counts)                                                    # [K] end of each key's run
        self._cursor = self._end - counts                                                # [K] next run index to check
        self._next_use = np.full(layout.num_keys, NEVER, dtype=np.int64)                # [K] of residents
        self.clock = -1

    def advance(self) -> None:
        self.clock += 1

    def observe(self, layer: int, chosen: Sequence[int], router_probs: np.ndarray | None = None) -> None:
        self.advance()

    def next_use(self, key: int) -> int:
        """First call after the clock that uses ``key`` (NEVER if none)."""
        i, end = self._cursor[key], self._end[key]
        while i < end and self._steps[i] <= self.clock:
            i += 1
        self._cursor[key] = i
        return int(self._steps[i]) if i < end else NEVER

    def touch(self, key: int) -> None:
        self._next_use[key] = self.next_use(key)

    def admit(self, key: int) -> None:
        self._next_use[key] = self.next_use(key)

    def remove(self, key: int) -> None:
        self._next_use[key] = NEVER

    def victim(self, candidates: Sequence[int]) -> int:
        keys = np.fromiter(candidates, dtype=np.int64)      # [C]
        due = self._next_use[keys]
        return int(keys[due == due.max()].min())
