"""FrequencyOraclePolicy: keeps the experts the whole trace selects most often, for simulation only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import CachePolicy
from .layout import ExpertLayout


class FrequencyOraclePolicy(CachePolicy):
    """Evict the candidate with the lowest chance of selection at its layer's next call (ties: the
    smallest key), from statistics of the whole trace.

    It knows how often each expert will be selected, never when: the most an
    online policy can learn from a stationary routing distribution. Between
    it and Belady (who knows when) lies what only knowledge of the future
    order buys; between the runtime's policies and it, what a better estimate
    of popularity would buy. ``future`` as for BeladyPolicy: every router
    call's keys in order; or ``rates`` [K], known selection rates (e.g. the
    share of tokens whose top-k holds each expert).

    ``repeat``: for a trace whose tokens repeat the previous token's experts at
    a layer with that probability (the synthetic traces' ``repeat``), an
    expert's chance is ``repeat`` if its layer's last call selected it plus
    ``(1 - repeat)`` times its selection rate: the best one call ahead for a
    policy that knows the process but not its draws.
    """

    name = "frequency"
    needs_layout = True
    needs_future = True

    def __init__(self, layout: ExpertLayout, future: Sequence[Sequence[int]] = (), repeat: float = 0.0,
                 rates: np.ndarray | None = None) -> None:
        if rates is None:                                                          # [K] per call of its layer
            keys = np.fromiter((k for call in future for k in call), dtype=np.int64)
            uses = np.bincount(keys, minlength=layout.num_keys)[: layout.num_keys]
            rates = uses / max(1, len(future) // max(1, layout.num_layers))
        self.experts = layout.experts_per_layer
        self.repeat = float(repeat)
        self.value = (1.0 - self.repeat) * np.asarray(rates, dtype=np.float64)      # [K]
        self._last: dict[int, list[int]] = {}                                       # layer -> its last selection

    def observe(self, layer: int, chosen: Sequence[int], router_probs: np.ndarray | None = None) -> None:
        if not self.repeat:
            return
        base = layer * self.experts
        for e in self._last.get(layer, []):
            self.value[base + e] -= self.repeat
        self._last[layer] = [int(e) for e in chosen]
        for e in self._last[layer]:
            self.value[base + e] += self.repeat

    def touch(self, key: int) -> None:
        pass

    def admit(self, key: int) -> None:
        pass

    def remove(self, key: int) -> None:
        pass

    def victim(self, candidates: Sequence[int]) -> int:
        keys = np.fromiter(candidates, dtype=np.int64)      # [C]
        values = self.value[keys]
        return int(keys[values == values.min()].min())
