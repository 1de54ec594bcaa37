"""CallProtocol: the one order of an MoE layer call, shared by the engine and the simulator.

T = tokens, E = experts per layer, k = experts per token, H = hidden size

For one router call of MoE layer l:

1. router (``on_router``, the RouterTap listener): the call's token counts per
   expert, its router scores (when the policy wants them) and the predictor's
   summary come back to the host in one readback; the policy is hinted with the
   predicted shares of layer l+1, and prefetches for l+1..l+depth are queued.
2. ``run``: prefetches aimed at l are settled -> residency is looked up -> the
   scheduler plans (cost model, link backlog) -> hits and misses are counted ->
   the policy observes the call -> demand copies start (the call's device
   experts locked) -> the CPU-run experts start -> CPU-run misses fill free
   slots -> each device expert, resident ones first, waits for its copy, runs
   and is touched.

What running an expert means belongs to the caller (``Compute``): the engine
runs its FFN on the device or the CPU; the simulator's time comes from the
plan. The copier is the engine's CopyEngine or the simulator's link model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch

from ..cache import ExpertCache, ExpertLayout
from ..errors import MoEOffloadError
from ..transfer.readback import HostReadback
from .prefetch import Prediction
from .residency import DEMAND, PREFETCH, ExpertResidency
from .scheduler import COPY, CPU, RESIDENT, ExpertLoad, Plan, PlanMemo
from .stats import OffloadStats
from .worth import ExpectedUse, LinkBudget

PROJECTED_EXPERTS = 4   # a coming layer's duration is planned from its prediction up to this many experts per top-k


class PredictedExpert(NamedTuple):
    """An expert predicted for a coming layer: its key, expected tokens, and its CPU seconds weighed by its
    predicted chance and device seconds at that many tokens."""

    expert: int
    key: int
    tokens: int
    weighed_cpu_s: float
    gpu_s: float


@dataclass(frozen=True)
class RouterRecord:
    """What the host knows of one router call."""

    counts: list[int]            # [E] tokens routed to each expert
    probs: np.ndarray | None     # [T, E] router scores, when the cache policy wants them


class Compute(Protocol):
    """How a call's experts run: the engine computes them, the simulator only costs the plan."""

    def cpu(self, experts: list[int], keys: list[int]) -> None:
        """Start the CPU-run experts (possibly none), before the device ones."""

    def device(self, expert: int, slot: int) -> None:
        """Run ``expert`` from device slot ``slot`` (its copy has landed)."""


class Costed:
    """Compute for the simulator: nothing runs; the call's time is the plan's."""

    def cpu(self, experts: list[int], keys: list[int]) -> None:
        pass

    def device(self, expert: int, slot: int) -> None:
        pass


class CallProtocol:
    """Per MoE layer call: residency, plan, copies, compute, observe (see the module docstring).

    ``copier``: a CopyEngine, or anything with its copy-in calls (``copy``,
    ``prefetch``, ``cancel``, ``expedite``, ``busy_keys``, ``backlog_bytes``,
    ``landed``, ``begin_read``, ``end_read``, ``pump``). ``cpu_experts``: 'never'
    copies every miss, 'always' runs every miss on the CPU, 'auto' lets the
    scheduler choose with ``costs``. ``prefetcher`` (set after construction):
    a Prefetcher built on ``residency``, or None. ``promote=False`` turns
    promotion off (static placement after warm-up, for comparison). ``host_wait``:
    how the host waits for the router call's readback (transfer.readback.HOST_WAITS).
    """

    def __init__(self, layout: ExpertLayout, cache: ExpertCache, copier, stats: OffloadStats,
                 cpu_experts: str = "never", costs=None, device: torch.device | str = "cpu", promote: bool = True,
                 host_wait: str = "spin"):
        if cpu_experts == "auto" and costs is None:
            raise ValueError("cpu_experts='auto' needs a cost model")
        self.layout = layout
        self.cache = cache
        self.copier = copier
        self.stats = stats
        self.cpu_experts = cpu_experts
        self.costs = costs
        self.promote = promote
        self.plans = PlanMemo(costs, cpu_experts)
        self.residency = ExpertResidency(cache, copier, stats, layout.experts_per_layer)
        self.prefetcher = None
        self.readback = HostReadback(torch.device(device), host_wait)   # the router call's numbers, one copy a layer
        self.expected_use = ExpectedUse(layout)
        self.layer_s = np.zeros(layout.num_layers)              # [L] each layer's last call duration (with costs)
        self._routed: dict[int, RouterRecord] = {}
        # [E] token counts per expert, counted in place: torch.bincount reads its input's min and max back to
        # the host first (two blocking syncs per layer on CUDA), scatter_add_ into a fixed-size tensor does not.
        self._counts = torch.zeros(layout.experts_per_layer, dtype=torch.int64, device=device)
        self._one = torch.ones(1, dtype=torch.int64, device=device)

    # -- 1. the router call ------------------------------------------------------------------------------------
    def on_router(self, layer: int, gate_input: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        """RouterTap listener, just before the layer's experts: one readback brings back the token counts,
        the router scores the policy wants and the predictor's summary; then ``route``."""
        parts = [self.count(chosen.reshape(-1))]                                          # [E]
        if self.cache.policy.wants_router_probs:
            parts.append(probs)                                                          # [T, E]
        summary = [] if self.prefetcher is None else self.prefetcher.summarize(layer, gate_input, probs, chosen)
        host = self.readback.read(parts + summary)
        scores = host[1].reshape(probs.shape) if len(parts) > 1 else None
        self.route(layer, RouterRecord(host[0].astype(np.int64).tolist(), scores), host[len(parts):])

    def route(self, layer: int, record: RouterRecord, summary: list[np.ndarray] = ()) -> None:
        """Host half of a router call: keep its record for ``run``, hint the policy with the predicted
        next-layer shares, queue the prefetches. ``summary``: the prefetcher's parts, read back."""
        self._routed[layer] = record
        if self.prefetcher is None:
            return
        prediction = self.prefetcher.read(layer, summary)
        if prediction.next_shares is not None and self.cache.policy.uses_hints:
            self.cache.policy.hint(layer + 1, prediction.next_shares)
        budget = self._link_budget(layer, record, prediction)
        self.prefetcher.issue(layer, prediction, [e for e, n in enumerate(record.counts) if n], budget,
                              None if budget is None else self.expected_use)

    def _link_budget(self, layer: int, record: RouterRecord, prediction: Prediction) -> LinkBudget | None:
        """The link time this router call's prefetches may spend (None without a cost model: no limit): a
        copy for layer l+d must land before it would delay layer l+d, i.e. within the durations of layers
        l..l+d-1 (this call's as planned now, the others' projected from the prediction) plus that layer's
        slack, behind what is on the link and this call's demand copies."""
        if self.costs is None:
            return None
        counts = record.counts
        slots = {e: self.cache.lookup(self.layout.key(layer, e)) for e, n in enumerate(counts) if n}
        plan = self.plan(slots, counts, layer)                # the call about to run, as it stands now
        copy_s = self.costs.copy_s()
        start = self.costs.link_s(self.copier.pending_bytes()) + len(plan.experts(COPY)) * copy_s
        depth = min(self.prefetcher.depth, self.layout.num_layers - 1 - layer)
        tokens = sum(counts) // max(1, self.layout.top_k)
        known = {}     # distance -> the predicted experts of layer + distance (made once for this call)
        return LinkBudget(start, copy_s, [plan.finish_s], depth,
                          lambda distance: self._projected_s(layer + distance, prediction, distance, tokens, known),
                          lambda distance, expert: self._slack_s(layer + distance, prediction, distance, expert,
                                                                 tokens, known))

    def _predicted(self, target: int, prediction: Prediction, distance: int, tokens: int,
                   known: dict | None) -> list[PredictedExpert] | None:
        """The experts predicted for layer ``target`` with their expected token counts and costs (made once per
        router call and distance, kept in ``known``; None: made now); None when the prediction does not reach
        the layer or names too many experts to plan cheaply."""
        if known is None:
            return self._predicted_experts(target, prediction, distance, tokens)
        if distance not in known:
            known[distance] = self._predicted_experts(target, prediction, distance, tokens)
        return known[distance]

    def _predicted_experts(self, target: int, prediction: Prediction, distance: int,
                           tokens: int) -> list[PredictedExpert] | None:
        if distance > len(prediction.weights):
            return None
        members = sorted(prediction.ranked(distance))
        if not members or len(members) > PROJECTED_EXPERTS * self.layout.top_k:
            return None
        shares, k, costs = prediction.shares[distance - 1], self.layout.top_k, self.costs
        found = []
        for e in members:
            count = max(1, round(tokens * k * float(shares[e])))
            found.append(PredictedExpert(e, self.layout.key(target, e), count,
                                         prediction.chance(distance, e) * costs.cpu_s(count), costs.gpu_s(count)))
        return found

    def _projected_s(self, target: int, prediction: Prediction, distance: int, tokens: int,
                     known: dict | None = None) -> float:
        """Layer ``target``'s duration as the scheduler would plan it for its predicted experts, resident if
        they hold a slot (copies queued for them included); its last duration when the prediction does not say."""
        predicted = self._predicted(target, prediction, distance, tokens, known)
        if predicted is None:
            return float(self.layer_s[target])
        lookup = self.cache.lookup
        return self.plans.plan([ExpertLoad(p.expert, p.tokens, resident=lookup(p.key) >= 0)
                                for p in predicted]).finish_s

    def _slack_s(self, target: int, prediction: Prediction, distance: int, expert: int, tokens: int,
                 known: dict | None = None) -> float:
        """How late into layer ``target`` a copy of ``expert`` may land without delaying the layer: the CPU
        time of its predicted experts without a slot (each weighed by its predicted chance), which run
        meanwhile, beyond the device time of those with one and ``expert``'s; 0 when misses are copied."""
        predicted = None if self.cpu_experts == "never" else \
            self._predicted(target, prediction, distance, tokens, known)
        if predicted is None:
            return 0.0
        lookup = self.cache.lookup
        resident = [p.expert == expert or lookup(p.key) >= 0 for p in predicted]
        cpu_s = sum(p.weighed_cpu_s for p, held in zip(predicted, resident) if not held)
        return max(0.0, cpu_s - sum(p.gpu_s for p, held in zip(predicted, resident) if held))

    def count(self, ids: torch.Tensor) -> torch.Tensor:
        """[E] tokens per expert of flat ids ``ids`` [T*k], on their device with no host sync (a fixed-size
        result; the tensor is reused by the next call, after its readback)."""
        if self._counts.device != ids.device:      # e.g. built for "cuda", called on "cuda:0": rebind once
            self._counts, self._one = self._counts.to(ids.device), self._one.to(ids.device)
        return self._counts.zero_().scatter_add_(0, ids.long(), self._one.expand(ids.numel()))

    def record(self, layer: int, ids: torch.Tensor) -> RouterRecord:
        """The router call's record for the experts call with flat ids ``ids`` [T*k]; read here when the
        router hook did not run for this call."""
        record = self.routed(layer, ids.numel())
        if record is None:
            counts = self.readback.read([self.count(ids)])[0]
            return RouterRecord(counts.astype(np.int64).tolist(), None)
        return record

    def routed(self, layer: int, assignments: int) -> RouterRecord | None:
        """The record ``route`` kept for layer ``layer``'s call, taken, if it counts ``assignments`` (T*k)
        routings; else None (``record`` then counts the ids)."""
        record = self._routed.pop(layer, None)
        return record if record is not None and sum(record.counts) == assignments else None

    # -- 2. the experts call -----------------------------------------------------------------------------------
    def run(self, layer: int, tokens: int, record: RouterRecord, compute: Compute) -> Plan:
        """Run one experts call of ``tokens`` tokens routed as ``record``; returns the scheduler's plan."""
        selected = [e for e, n in enumerate(record.counts) if n]
        keys = {e: self.layout.key(layer, e) for e in selected}
        self.residency.call_keys = set(keys.values())
        if self.prefetcher is not None:
            self.prefetcher.begin_layer(layer, set(keys.values()))
        slots = {e: self.cache.lookup(key) for e, key in keys.items()}   # -1: not resident
        plan = self.plan(slots, record.counts, layer)
        resident_now = {e for e, slot in slots.items() if slot >= 0}
        self._count(layer, tokens, plan, resident_now)
        self._observe(layer, selected, record.probs)
        resident, copied, on_cpu = plan.experts(RESIDENT), plan.experts(COPY), plan.experts(CPU)
        device = resident + copied                 # resident first, while copies land
        locked = {keys[e] for e in device}         # device experts not yet run: never evicted
        for e in resident:
            self.residency.expedite(keys[e])       # a prefetch still queued is a demand now
        for e in copied:                           # start copies now, into slots this call does not need
            if self.residency.copy_in(keys[e], DEMAND, locked) is None:
                break
        for e in on_cpu:
            self.residency.ensure_host(keys[e])
        compute.cpu(on_cpu, [keys[e] for e in on_cpu])
        self._fill(layer, [keys[e] for e in on_cpu])
        self._promote(layer, [keys[e] for e in on_cpu], locked)
        for e in device:
            key = keys[e]
            slot = self._slot(key, locked)
            self.copier.begin_read(slot, key)
            compute.device(e, slot)
            self.copier.end_read(slot)
            self.copier.pump()                     # keep prefetch chunks flowing between experts
            locked.discard(key)
            self.cache.touch(key)
        self.expected_use.observe(layer, selected)
        if self.costs is not None:
            self.layer_s[layer] = plan.finish_s
        return plan

    def plan(self, slots: dict[int, int], counts: list[int], layer: int | None = None) -> Plan:
        """Where each selected expert runs (``slots``: expert -> slot or -1). In 'auto' a new copy queues
        behind the bytes already on the link, a resident expert still in flight is ready when it lands, and
        (with a disk tier, given ``layer``) an expert not in host memory is read from disk first."""
        backlog = 0.0
        if self.costs is not None:
            pending = self.copier.backlog_bytes()
            backlog = self.costs.link_s(pending) if pending else 0.0
        loads = []
        for e, slot in slots.items():
            in_flight = slot >= 0 and self.costs is not None and not self.copier.landed(slot)
            ready = self.costs.link_s(self.copier.ready_bytes(slot)) if in_flight else 0.0
            loads.append(ExpertLoad(e, counts[e], resident=slot >= 0, ready_s=ready,
                                    disk_s=self._disk_s(layer, e) if slot < 0 else 0.0))
        return self.plans.plan(loads, backlog)

    def _disk_s(self, layer: int | None, expert: int) -> float:
        host = self.residency.host
        if host is None or layer is None or self.costs is None:
            return 0.0
        return host.read_s(self.layout.key(layer, expert), self.costs.disk_s())

    def _slot(self, key: int, locked: set[int]) -> int:
        slot = self.cache.lookup(key)
        if slot >= 0:
            return slot
        slot = self.residency.copy_in(key, DEMAND, locked)   # no slot was free when the call's copies started
        if slot is None:
            raise MoEOffloadError(f"no evictable slot for expert {key}: every slot of its pool is in use by this "
                                  "layer call; give the layer more expert slots")
        return slot

    def _fill(self, layer: int, cpu_keys: list[int]) -> None:
        """Experts the CPU runs now also take free slots, copied at low priority, so later calls hit.
        Only free slots: nothing resident is evicted for them. Only in 'auto' (no copies in 'always')."""
        if self.cpu_experts != "auto":
            return
        for key in cpu_keys:   # (the scheduler may also run a resident expert on the CPU)
            if self.cache.lookup(key) < 0 and self.residency.copy_in(key, PREFETCH, evict=False) is not None:
                self.stats.cpu_fills[layer] += 1

    def _promote(self, layer: int, cpu_keys: list[int], locked: set[int]) -> None:
        """While the link is idle, the CPU-run expert likeliest to be selected again is copied in at low
        priority, evicting only a resident less likely to be used (the policy picks which), never one of
        this call's device experts (``locked``). With a cost model only (the engine's 'auto', the
        simulator), one per call."""
        if not self.promote or self.costs is None or self.cpu_experts != "auto" or not cpu_keys \
                or not self.copier.idle():
            return
        use = self.expected_use.use
        candidates = [key for key in cpu_keys if self.cache.lookup(key) < 0]
        if not candidates:
            return
        key = max(candidates, key=lambda k: use[k])
        protected = self.expected_use.protected(self.cache.slots, self.expected_use.once_more(key))
        if self.residency.copy_in(key, PREFETCH, protected | locked) is not None:
            self.stats.promotions[layer] += 1

    def _observe(self, layer: int, selected: list[int], probs: np.ndarray | None) -> None:
        policy = self.cache.policy
        if policy.wants_router_probs and probs is not None:
            policy.observe(layer, selected, probs)   # [T, E] host scores, read back with the router's
        else:
            policy.observe(layer, selected)

    def _count(self, layer: int, tokens: int, plan: Plan, resident: set[int]) -> None:
        """Hits: selected experts resident when the call ran (wherever the plan runs them)."""
        self.stats.layer_calls[layer] += 1
        self.stats.tokens[layer] += tokens
        self.stats.hits[layer] += len(resident)
        self.stats.misses[layer] += len(plan.placement) - len(resident)
        self.stats.cpu_experts[layer] += sum(e not in resident for e in plan.experts(CPU))
