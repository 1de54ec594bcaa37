"""ReplayPrefetch: the runtime's Prefetcher and predictors driven by a routing trace in the cache simulator.

N = traced tokens, L = MoE layers, E = experts per layer, k = experts per token, H = hidden size

The simulator calls ``on_call`` before it replays each router call, in the
order the runtime makes them: the router hook (``Prefetcher.on_router``: the
predictor observes layer l and prefetches for l+1..l+depth) and then the
start of the layer (``Prefetcher.begin_layer``: prefetches aimed at l are
settled as used or wasted). Slots are taken through the simulator's
ExpertCache, so prefetches evict under the same policy as demand copies.
Every prefetch is taken as copied and landed before its layer runs (a
replay has no streams to cancel a copy on).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cache import ExpertCache
from .cache.routing import RouterCall
from .prefetch import Prefetcher
from .residency import ExpertResidency
from .stats import OffloadStats


@dataclass(frozen=True)
class _Keys:
    """The part of a HostExpertStore a Prefetcher uses: sizes and flat keys."""

    num_layers: int
    num_experts: int

    def key(self, layer: int, expert: int) -> int:
        return layer * self.num_experts + expert


class _ReplayCopier:
    """The CopyEngine calls a Prefetcher makes, counted: every prefetch is copied, none cancelled."""

    def __init__(self) -> None:
        self.copies = 0

    def prefetch(self, key: int, slot: int) -> None:
        self.copies += 1

    def cancel(self, key: int) -> bool:
        return False

    def busy_keys(self) -> set[int]:
        return set()

    def pump(self) -> None:
        pass


class ReplayPrefetch:
    """One run's prefetching over ``trace`` (a predictor Trace) with a fresh ``predictor``."""

    def __init__(self, trace, predictor, depth: int = 1, width: int | None = None):
        if predictor.needs_gate_inputs and trace.gate_inputs is None:
            raise ValueError(f"predictor {predictor.name!r} needs gate inputs; record the trace with them "
                             "(moe-offload trace --gate-inputs)")
        if trace.router_probs is None:
            raise ValueError("prefetch replay needs the trace's router scores")
        n, layers, k = trace.expert_ids.shape
        self.ids = torch.from_numpy(np.asarray(trace.expert_ids, dtype=np.int64))             # [N, L, k]
        self.probs = torch.from_numpy(np.asarray(trace.router_probs, dtype=np.float32))       # [N, L, E]
        if trace.gate_inputs is not None:
            self.gates = torch.from_numpy(np.asarray(trace.gate_inputs, dtype=np.float32))    # [N, L, H]
        else:
            self.gates = torch.zeros(n, layers, 0)                                            # [N, L, 0]
        self.predictor = predictor
        self.keys = _Keys(layers, self.probs.shape[2])
        self.stats = OffloadStats(layers, 0)
        self.copier = _ReplayCopier()
        self.depth = depth
        self.width = width or k
        self._prefetcher: Prefetcher | None = None

    @property
    def copies(self) -> int:
        return self.copier.copies

    @property
    def used(self) -> int:
        return int(self.stats.prefetch_used.sum())

    def on_call(self, call: RouterCall, cache: ExpertCache) -> None:
        if self._prefetcher is None:
            residency = ExpertResidency(cache, self.copier, self.stats, self.keys.num_experts)
            self._prefetcher = Prefetcher(self.predictor, residency, self.keys, self.stats, self.depth, self.width)
        rows, layer = slice(call.start, call.end), call.layer
        self._prefetcher.on_router(layer, self.gates[rows, layer], self.probs[rows, layer], self.ids[rows, layer])
        self._prefetcher.begin_layer(layer, set(call.keys))
