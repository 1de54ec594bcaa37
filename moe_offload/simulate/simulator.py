"""Simulator: replays a routing trace through the runtime's own call protocol, costed by a model.

G = router-call spans, L = MoE layers, E = experts per layer, N = tokens, k = experts per token, H = hidden size

A replay builds what the engine builds (ExpertCache over bookkeeping-only
slots, the policy and slot pools, OffloadStats, the CallProtocol and, with a
predictor, the runtime's Prefetcher) and makes, for every router call, the
engine's two calls: the router's (``route``, or ``on_router`` when
prefetching: the predictor reads the trace's gate inputs) and the experts'
(``run``). Only the copier and the compute differ: copies go to a
SimulatedLink, a link on a simulated clock that serves demand copies before
prefetches, and nothing is computed. Prompts replay as one call per layer,
generated tokens one call each (``calls.call_spans``).

Time per call is the scheduler's plan under the cost model (the same
``plan_layer`` the engine runs), which waits for the demand copies already
on the link and for prefetches still landing; the link's clock then moves by
that time, and prefetches and promotions land in the link time the calls
leave free. It counts the routed experts only (attention and the other dense
parts are the same for every policy and budget, and are left out, so the
link time they would leave to prefetch is not counted either).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..cache import (
    SIMULATION_ONLY,
    CachePolicy,
    ExpertCache,
    ExpertSlots,
    SlotPools,
    make_policy,
    slot_pools,
)
from ..runtime.host_tier import HostTier
from ..runtime.prefetch import Prefetcher, summary_parts
from ..runtime.protocol import CallProtocol, Costed, RouterRecord
from ..runtime.stats import OffloadStats
from ..transfer import ExpertShape, HostExpertStore
from .calls import RouterCall, RoutingArrays, router_calls
from .disk import SimulatedDisk
from .link import SimulatedLink
from .miss_curves import lru_miss_curves

_NO_COMPUTE = Costed()   # a replay runs no expert
SUMMARY_CHUNK_TOKENS = 512   # tokens a row-independent predictor summarizes at once (bounds the memory)


def _span_chunks(spans: np.ndarray, tokens: int) -> Iterator[np.ndarray]:
    """[G, 2] call spans in consecutive chunks of about ``tokens`` tokens (a longer span is a chunk alone)."""
    start = 0
    while start < len(spans):
        end = int(np.searchsorted(spans[:, 1], spans[start, 0] + tokens, side="right"))
        end = max(end, start + 1)
        yield spans[start:end]
        start = end


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
    promotions: int = 0         # CPU-run experts copied in while the link was idle (bytes in bytes_copied)
    disk_reads: int = 0         # experts read from disk into the host cache (the disk tier; prefetches included)
    bytes_per_expert: int = 0
    disk_prefetches: int = 0    # ... of them read ahead of need (the rest: demand reads, on the calls' path)
    decode_tokens: int = 0      # generated tokens of the trace (one call each) ...
    decode_seconds: float = 0.0  # ... and their projected time (prompts left out)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    @property
    def disk_bytes_per_token(self) -> float:
        return self.disk_reads * self.bytes_per_expert / self.tokens if self.tokens else 0.0

    @property
    def demand_bytes_per_token(self) -> float:
        """Bytes read from disk per token while a call waited (reads ahead not counted)."""
        return (self.disk_reads - self.disk_prefetches) * self.bytes_per_expert / self.tokens if self.tokens else 0.0

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
                               "disk_bytes_per_token": self.disk_bytes_per_token,
                               "demand_bytes_per_token": self.demand_bytes_per_token,
                               "seconds_per_token": self.seconds_per_token, "tokens_per_s": self.tokens_per_s,
                               "decode_tokens_per_s": self.decode_tokens_per_s}


class Simulator:
    """Replays ``routing`` for any policy, allocation and slot count.

    ``cost``: anything with copy_s(), gpu_s(tokens), cpu_s(tokens) (e.g. a
    CostModel), or None for hit rates only. ``cpu_experts``: how misses are
    placed, as OffloadConfig.cpu_experts ('auto' needs ``cost``).
    ``predictor``: makes a fresh Predictor per run; the runtime's Prefetcher
    then prefetches ``prefetch_depth`` layers ahead, ``prefetch_width``
    experts per token (default: top-k). ``miss_curves`` [L, E+1] for the 'dp'
    allocation, measured on another trace; by default they are measured on
    ``routing`` itself (in-sample, so optimistic). ``timed_link=False`` lands
    every copy at once, as the engine's immediate CPU backend does (for
    comparing counts with it); the plans still use ``cost``. ``promote=False``
    turns promotion off: with no predictor, the static placement after warm-up.
    ``host_rows`` below the expert count adds the disk tier: a host cache of that
    many experts under ``host_policy`` (the runtime's HostTier), reads from a
    simulated disk at ``cost.disk_s()`` per expert.
    """

    def __init__(self, routing: RoutingArrays, cost=None, bytes_per_expert: int = 0, cpu_experts: str = "never",
                 predictor: Callable[[], object] | None = None, prefetch_depth: int = 1,
                 prefetch_width: int | None = None, miss_curves: np.ndarray | None = None, timed_link: bool = True,
                 promote: bool = True, host_rows: int | None = None, host_policy: str = "lru"):
        self.routing = routing
        self.layout = routing.layout
        self.cost = cost
        self.bytes_per_expert = int(bytes_per_expert)
        self.cpu_experts = cpu_experts
        self.predictor = predictor
        self.prefetch_depth = prefetch_depth
        self.prefetch_width = prefetch_width or self.layout.top_k
        self.timed_link = timed_link
        self.promote = promote
        self.host_rows = host_rows if host_rows is not None and host_rows < self.layout.num_keys else None
        self.host_policy = host_policy
        self.calls: list[list[RouterCall]] = router_calls(routing)   # [G][L]
        self._miss_curves = miss_curves
        self._ids = torch.from_numpy(np.asarray(routing.expert_ids, dtype=np.int64))   # [N, L, k]
        self._tensors = self._router_tensors() if predictor is not None else None

    def _router_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate inputs [N, L, H], router scores [N, L, E], chosen [N, L, k]) for the prefetcher."""
        routing = self.routing
        if routing.router_probs is None:
            raise ValueError("prefetch replay needs the trace's router scores")
        predictor = self.predictor()   # one made now, so a missing input fails before any run
        if predictor.needs_gate_inputs and routing.gate_inputs is None:
            raise ValueError(f"predictor {predictor.name!r} needs gate inputs; record the trace with them "
                             "(moe-offload trace --gate-inputs)")
        probs = torch.from_numpy(np.asarray(routing.router_probs, dtype=np.float32))
        if routing.gate_inputs is not None:
            gates = torch.from_numpy(np.asarray(routing.gate_inputs, dtype=np.float32))
        else:
            gates = torch.zeros(*self._ids.shape[:2], 0)
        return gates, probs, self._ids

    def miss_curves(self) -> np.ndarray:
        """[L, E+1] per-layer miss curves for the 'dp' allocation (given, or LRU curves of this trace)."""
        if self._miss_curves is None:
            self._miss_curves = lru_miss_curves(self.routing)
        return self._miss_curves

    def make_policy(self, name: str, **params) -> CachePolicy:
        """A fresh policy ``name``; those that need the future (Belady, the frequency oracle) get this trace's."""
        if name in SIMULATION_ONLY:
            return SIMULATION_ONLY[name](self.layout, [call.keys for calls in self.calls for call in calls])
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
        stats = OffloadStats(self.layout.num_layers, self.bytes_per_expert)
        copy_s = self.cost.copy_s() if self.cost is not None and self.timed_link else 0.0
        link = SimulatedLink(copy_s, self.bytes_per_expert)
        protocol = CallProtocol(self.layout, cache, link, stats, self.cpu_experts, self.cost, promote=self.promote)
        if self.predictor is not None:
            protocol.prefetcher = Prefetcher(self.predictor(), protocol.residency, self.layout, stats,
                                             self.prefetch_depth, self.prefetch_width)
        disk = self._disk_tier(protocol, link, stats)
        summaries = self._summaries(protocol.prefetcher)
        seconds = decode_s = 0.0
        decode = np.asarray(self.routing.decode, dtype=bool)
        for calls in self.calls:
            summary = None if summaries is None else next(summaries)
            generated = decode[calls[0].start]
            for call in calls:
                call_s = self._replay(protocol, link, call, disk, None if summary is None else summary(call.layer))
                seconds += call_s
                if generated:
                    decode_s += call_s
        name = allocation if isinstance(allocation, str) else "custom"
        return SimulationResult(policy.name, name, num_slots, self.routing.num_tokens, int(stats.hits.sum()),
                                int(stats.misses.sum()), link.demand, link.copies * self.bytes_per_expert, seconds,
                                tuple(stats.hits.tolist()), tuple(stats.misses.tolist()), int(stats.cpu_fills.sum()),
                                int((stats.prefetch_issued - stats.prefetch_cancelled).sum()),
                                int(stats.prefetch_used.sum()), int(stats.promotions.sum()),
                                int(stats.disk_reads.sum()), self.bytes_per_expert, int(stats.disk_prefetches.sum()),
                                int(decode.sum()), decode_s)

    def _disk_tier(self, protocol: CallProtocol, link: SimulatedLink, stats: OffloadStats) -> SimulatedDisk | None:
        """With ``host_rows``: the runtime's HostTier over bookkeeping rows and a simulated disk."""
        if self.host_rows is None:
            return None
        layout = self.layout
        disk = SimulatedDisk(self.cost.disk_s() if self.cost is not None and self.timed_link else 0.0)
        store = HostExpertStore(layout.num_layers, layout.experts_per_layer, ExpertShape(1, 1), torch.float32,
                                pin=False, capacity=self.host_rows)     # rows of 12 bytes: bookkeeping only
        cache = ExpertCache(ExpertSlots.bookkeeping(self.host_rows, layout.num_keys), self.make_policy(self.host_policy),
                            slot_pools("global", self.host_rows, layout))
        runs = {key: [] for key in range(layout.num_keys)}
        protocol.residency.host = HostTier(store, cache, disk, runs, link, stats, "simulated disk")
        return disk

    def _summaries(self, prefetcher: Prefetcher | None) -> Iterator[Callable[[int], list[np.ndarray]]] | None:
        """Per call span, in order: layer -> the host summary its router call reads back (``summarize``'s
        parts; the live recall, which no result reads, left out). For a predictor whose rows are independent
        it observes and predicts a chunk of calls' tokens at once, and the summaries of the chunk's calls
        come out together; None for other predictors (each router call then summarizes itself)."""
        if prefetcher is None or not prefetcher.predictor.row_independent:
            return None
        return self._chunk_summaries(prefetcher)

    def _chunk_summaries(self, prefetcher: Prefetcher) -> Iterator[Callable[[int], list[np.ndarray]]]:
        gates, probs, ids = self._tensors
        layers, spans = self.layout.num_layers, self.routing.spans()
        no_recall = np.array([-1.0, 0.0], dtype=np.float32)
        for chunk in _span_chunks(spans, SUMMARY_CHUNK_TOKENS):
            rows, first = slice(int(chunk[0, 0]), int(chunk[-1, 1])), int(chunk[0, 0])
            single = np.flatnonzero(chunk[:, 1] - chunk[:, 0] == 1)                    # one-token calls
            parts = [[] for _ in range(layers)]                                         # [L][2D] of [G, E]
            for layer in range(layers):
                prefetcher.predictor.observe(layer, gates[rows, layer], ids[rows, layer], probs[rows, layer])
                for distance in range(1, min(prefetcher.depth, layers - 1 - layer) + 1):
                    scores = prefetcher.predictor.predict(layer, distance).float()   # [R, E] R = rows
                    shares = np.empty((len(chunk), scores.shape[-1]), dtype=np.float32)  # [G, E]
                    weights = np.empty_like(shares)
                    _, one_s, one_w = summary_parts(scores[chunk[single, 0] - first].unsqueeze(1), prefetcher.width)
                    shares[single], weights[single] = one_s.numpy(), one_w.numpy()
                    for g in np.flatnonzero(chunk[:, 1] - chunk[:, 0] > 1).tolist():   # prompts: one call each
                        _, shares[g], weights[g] = (x.numpy() for x in
                                                    summary_parts(scores[chunk[g, 0] - first : chunk[g, 1] - first],
                                                                  prefetcher.width))
                    parts[layer] += [shares, weights]
            for g in range(len(chunk)):
                yield lambda layer, g=g: [no_recall] + [x[g] for x in parts[layer]]

    def _replay(self, protocol: CallProtocol, link: SimulatedLink, call: RouterCall, disk=None,
                summary: list[np.ndarray] | None = None) -> float:
        """One router call, as the engine makes it; returns its projected seconds and moves the link's clock.
        ``summary``: the call's prefetch summary, computed ahead (else the call computes it)."""
        layer, rows = call.layer, slice(call.start, call.end)
        if summary is not None:
            protocol.route(layer, self._record(call), summary)
        elif self._tensors is not None:
            gates, probs, ids = (x[rows, layer] for x in self._tensors)
            protocol.on_router(layer, gates, probs, ids)
        else:
            protocol.route(layer, self._record(call))
        record = protocol.routed(layer, (call.end - call.start) * self.layout.top_k) \
            or protocol.record(layer, self._ids[rows, layer].reshape(-1))
        plan = protocol.run(layer, call.end - call.start, record, _NO_COMPUTE)
        if self.cost is None:
            return 0.0
        link.advance(plan.finish_s)
        if disk is not None:
            disk.advance(plan.finish_s)
        return plan.finish_s

    def _record(self, call: RouterCall) -> RouterRecord:
        """The call's host record from the trace: token counts per expert and, for the policy, its scores."""
        experts = self.layout.experts_per_layer
        counts = [0] * experts
        for key, tokens in zip(call.keys, call.tokens):
            counts[key - call.layer * experts] = tokens
        probs = self.routing.router_probs
        if probs is not None:
            probs = np.asarray(probs[call.start : call.end, call.layer], dtype=np.float32)   # [T, E]
        return RouterRecord(counts, probs)
