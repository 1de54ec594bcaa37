"""CacheSimulator: replays a routing trace through the runtime's ExpertCache and policies.

G = router-call spans, L = MoE layers, E = experts per layer, N = tokens

The replay drives the same ExpertCache, SlotPools and CachePolicy classes as
the engine, over bookkeeping-only ExpertSlots (no device buffers), and makes
the engine's calls in the engine's order for every router call:
observe -> misses acquire slots (the call's experts locked) -> each expert,
resident ones first, runs and is touched. Prompts replay as one call per
layer, generated tokens one call each (``routing.call_spans``).

Time per call comes from a MissScheduler (default CopyEveryMiss) and a cost
model; it counts the routed experts only (attention and the other dense
parts are the same for every policy and budget, and are left out).

Prefetch: ``prefetch`` makes, per run, a CallPrefetch whose ``on_call`` runs
before each call is replayed, as the runtime's router hook runs before the
layer's experts (moe_offload.replay_prefetch drives the runtime's Prefetcher
and predictors this way). Its copies take slots through the same ExpertCache;
they count in bytes copied and link time, and are taken to land before their layer runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from .allocation import lru_miss_curves, slot_pools
from .belady import BeladyPolicy
from .expert_cache import ExpertCache
from .miss_scheduler import CopyEveryMiss, ExpertCost, MissScheduler
from .policies import SIMULATION_ONLY, make_policy
from .policy import CachePolicy
from .pools import SlotPools
from .routing import RouterCall, RoutingArrays, router_calls
from .slots import ExpertSlots


@dataclass(frozen=True)
class SimulationResult:
    policy: str
    allocation: str
    slots: int
    tokens: int
    hits: int
    misses: int
    copies: int                 # misses copied into the cache
    bytes_copied: int
    seconds: float              # projected routed-expert time of the whole trace
    hits_per_layer: tuple[int, ...]
    misses_per_layer: tuple[int, ...]
    cpu_fills: int = 0          # CPU-run experts also copied into free slots (bytes in bytes_copied)
    prefetch_copies: int = 0    # experts copied by prefetch (their bytes are in bytes_copied)
    prefetch_used: int = 0      # prefetched experts their layer then selected

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    @property
    def bytes_copied_per_token(self) -> float:
        return self.bytes_copied / self.tokens if self.tokens else 0.0

    @property
    def seconds_per_token(self) -> float:
        return self.seconds / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return asdict(self) | {"hit_rate": self.hit_rate, "bytes_copied_per_token": self.bytes_copied_per_token,
                               "seconds_per_token": self.seconds_per_token, "tokens_per_s": self.tokens_per_s}


class CallPrefetch(Protocol):
    """Prefetch during a replay: ``on_call`` before each router call is replayed."""

    copies: int   # experts copied so far
    used: int     # prefetched experts their layer selected so far

    def on_call(self, call: RouterCall, cache: ExpertCache) -> None: ...


@dataclass
class _Counters:
    hits: np.ndarray
    misses: np.ndarray
    copies: int = 0
    fills: int = 0
    seconds: float = 0.0


class CacheSimulator:
    """Replays ``routing`` for any policy, allocation and slot count.

    ``cost``: anything with copy_s(), gpu_s(tokens), cpu_s(tokens) (e.g. a
    moe_offload CostModel), or None for hit rates only. ``predicted_scores``
    [N, L, E]: a predictor's scores for layer l of token t, handed to the
    policy as ``hint(l, ...)`` just before layer l-1's call of that token
    (one layer ahead, as a cross-layer predictor would). ``miss_curves``
    [L, E+1] for the 'dp' allocation, measured on another trace; by default
    they are measured on ``routing`` itself (in-sample, so optimistic).
    """

    def __init__(self, routing: RoutingArrays, cost: ExpertCost | None = None, bytes_per_expert: int = 0,
                 scheduler: MissScheduler | None = None, predicted_scores: np.ndarray | None = None,
                 miss_curves: np.ndarray | None = None, prefetch: Callable[[], CallPrefetch] | None = None):
        self.routing = routing
        self.prefetch = prefetch
        self.layout = routing.layout
        self.cost = cost
        self.bytes_per_expert = int(bytes_per_expert)
        self.scheduler = scheduler or CopyEveryMiss()
        self.predicted_scores = predicted_scores
        self.calls: list[list[RouterCall]] = router_calls(routing)   # [G][L]
        self._miss_curves = miss_curves

    def miss_curves(self) -> np.ndarray:
        """[L, E+1] per-layer miss curves for the 'dp' allocation (given, or LRU curves of this trace)."""
        if self._miss_curves is None:
            self._miss_curves = lru_miss_curves(self.routing)
        return self._miss_curves

    def make_policy(self, name: str, **params) -> CachePolicy:
        """A fresh policy ``name``; Belady gets this trace's future."""
        if name in SIMULATION_ONLY:
            return BeladyPolicy(self.layout, [call.keys for calls in self.calls for call in calls])
        return make_policy(name, self.layout, **params)

    def pools(self, allocation: str | SlotPools, num_slots: int) -> SlotPools:
        if isinstance(allocation, SlotPools):
            return allocation
        curves = self.miss_curves() if allocation == "dp" else None
        return slot_pools(allocation, num_slots, self.layout, curves)

    def run(self, policy: str | CachePolicy, num_slots: int, allocation: str | SlotPools = "global",
            **policy_params) -> SimulationResult:
        """Replay the whole trace from an empty cache of ``num_slots`` slots."""
        num_slots = min(int(num_slots), self.layout.num_keys)
        policy = self.make_policy(policy, **policy_params) if isinstance(policy, str) else policy
        cache = ExpertCache(ExpertSlots.bookkeeping(num_slots, self.layout.num_keys), policy,
                            self.pools(allocation, num_slots))
        layers = self.layout.num_layers
        counters = _Counters(np.zeros(layers, dtype=np.int64), np.zeros(layers, dtype=np.int64))
        prefetch = self.prefetch() if self.prefetch is not None else None
        for calls in self.calls:
            for call in calls:
                issued = 0
                if prefetch is not None:
                    before = prefetch.copies
                    prefetch.on_call(call, cache)
                    issued = prefetch.copies - before
                self._hint(policy, call)
                self._replay(cache, call, counters, issued)
        name = allocation if isinstance(allocation, str) else "custom"
        fetched, used = (prefetch.copies, prefetch.used) if prefetch is not None else (0, 0)
        return SimulationResult(policy.name, name, num_slots, self.routing.num_tokens, int(counters.hits.sum()),
                                int(counters.misses.sum()), counters.copies,
                                (counters.copies + counters.fills + fetched) * self.bytes_per_expert,
                                counters.seconds, tuple(counters.hits.tolist()), tuple(counters.misses.tolist()),
                                counters.fills, fetched, used)

    def _hint(self, policy: CachePolicy, call: RouterCall) -> None:
        if self.predicted_scores is None or call.layer + 1 >= self.layout.num_layers:
            return
        scores = self.predicted_scores[call.start : call.end, call.layer + 1]   # [T, E]
        policy.hint(call.layer + 1, np.asarray(scores, dtype=np.float64).mean(axis=0))

    def _replay(self, cache: ExpertCache, call: RouterCall, counters: _Counters, prefetched: int = 0) -> None:
        """One router call, in the engine's order (moe_offload.engine.Engine.run_layer)."""
        resident = [cache.lookup(key) >= 0 for key in call.keys]
        plan = self.scheduler.plan(call.tokens, resident, self.cost)
        hits = sum(resident)      # resident when the layer ran, wherever the plan runs them
        counters.hits[call.layer] += hits
        counters.misses[call.layer] += len(call.keys) - hits
        self._observe(cache.policy, call)
        device = [call.keys[i] for i in plan.device]
        copied = [call.keys[i] for i in plan.device if not resident[i]]
        locked = set(device)      # device experts not yet computed: never evicted
        for key in copied:        # start copies now, into slots this call does not need
            if cache.acquire(key, locked) is None:
                break
        fills = 0
        if getattr(self.scheduler, "fills_free_slots", False):
            for i in plan.cpu:    # CPU experts also take free slots, copied in the background
                if not resident[i] and cache.acquire(call.keys[i], evict=False) is not None:
                    fills += 1
        counters.fills += fills
        # the call lasts at least as long as the link needs for every copy it started (prefetches included)
        link = 0.0 if self.cost is None else (len(copied) + fills + prefetched) * self.cost.copy_s()
        counters.seconds += max(plan.seconds, link)
        for key in device:        # resident experts first, while copies land
            if cache.lookup(key) < 0:
                cache.acquire(key, locked)
            locked.discard(key)
            cache.touch(key)
        counters.copies += len(copied)

    def _observe(self, policy: CachePolicy, call: RouterCall) -> None:
        base = call.layer * self.layout.experts_per_layer
        chosen = [key - base for key in call.keys]
        probs = self.routing.router_probs
        if policy.wants_router_probs and probs is not None:
            policy.observe(call.layer, chosen, np.asarray(probs[call.start : call.end, call.layer], dtype=np.float32))
        else:
            policy.observe(call.layer, chosen)
