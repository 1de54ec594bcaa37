"""Scheduler: per MoE layer, where each selected expert runs so the layer ends soonest.

Each selected expert is either resident (device compute), a miss that is copied
then computed on the device, or a miss computed on the CPU. Three timelines
advance as work is assigned: the device (compute), the copy stream and the CPU.

The plan starts from HybriMoE's two-ended greedy: experts are listed resident
first, then misses, each group by token count (descending); repeatedly the
front item is costed on the device and the back item on the CPU, and the side
that would finish sooner takes its item. A second pass then moves single
experts between the device and the CPU while that lowers the layer's finish
time (the greedy cannot undo an early choice). Prefill (many tokens per
expert) and decode (few) differ only through the costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

RESIDENT, COPY, CPU = "resident", "copy", "cpu"
CPU_EXPERTS = ("auto", "never", "always")   # how misses are placed (OffloadConfig.cpu_experts)


class Costs(Protocol):
    def copy_s(self) -> float: ...
    def link_s(self, nbytes: int) -> float: ...
    def gpu_s(self, tokens: int) -> float: ...
    def cpu_s(self, tokens: int) -> float: ...


class ExpertLoad(NamedTuple):
    """One selected expert of a layer call (a named tuple: made per expert per call, and a plan's memo key)."""

    expert: int
    tokens: int
    resident: bool
    ready_s: float = 0.0     # resident experts still being copied in: when the copy lands
    disk_s: float = 0.0      # not in host memory (the disk tier): its read from disk comes first


@dataclass(frozen=True)
class Plan:
    placement: dict[int, str]   # expert -> RESIDENT | COPY | CPU
    finish_s: float             # projected end of the layer
    _groups: dict = field(default_factory=dict, compare=False, repr=False)   # where -> its experts (read-only)

    def experts(self, where: str) -> list[int]:
        """The experts placed ``where``, in placement order (the same list on every call: do not change it)."""
        group = self._groups.get(where)
        if group is None:
            group = self._groups[where] = [e for e, p in self.placement.items() if p == where]
        return group


def _device_finish(items: Sequence[ExpertLoad], costs: Costs, copy_backlog_s: float) -> float:
    """When the device finishes ``items`` (resident ones first, copies in order)."""
    gpu, copy, disk = 0.0, copy_backlog_s, 0.0
    for item in sorted(items, key=lambda i: (not i.resident, -i.tokens)):
        if item.resident:
            gpu = max(gpu, item.ready_s) + costs.gpu_s(item.tokens)
        else:
            disk += item.disk_s                          # reads from disk one after another
            copy = max(copy, disk) + costs.copy_s()
            gpu = max(gpu, copy) + costs.gpu_s(item.tokens)
    return gpu


def _cpu_finish(items: Sequence[ExpertLoad], costs: Costs) -> float:
    return sum(costs.cpu_s(i.tokens) + i.disk_s for i in items)


def _makespan(device: Sequence[ExpertLoad], cpu: Sequence[ExpertLoad], costs: Costs, backlog: float) -> float:
    return max(_device_finish(device, costs, backlog), _cpu_finish(cpu, costs))


def _greedy(loads: list[ExpertLoad], costs: Costs, backlog: float) -> tuple[list, list]:
    queue = sorted([i for i in loads if i.resident], key=lambda i: -i.tokens) + \
        sorted([i for i in loads if not i.resident], key=lambda i: -i.tokens)
    device: list[ExpertLoad] = []
    cpu: list[ExpertLoad] = []
    while queue:
        front, back = queue[0], queue[-1]
        on_device = _device_finish(device + [front], costs, backlog)
        on_cpu = _cpu_finish(cpu + [back], costs)
        if on_device <= on_cpu or back.resident and len(queue) == 1:
            device.append(queue.pop(0))
        else:
            cpu.append(queue.pop())
    return device, cpu


def _improve(device: list, cpu: list, costs: Costs, backlog: float) -> tuple[list, list]:
    """Move single experts across while the finish time strictly drops."""
    best = _makespan(device, cpu, costs, backlog)
    improved = True
    while improved:
        improved = False
        for item in list(device) + list(cpu):
            if item in device:
                d, c = [i for i in device if i is not item], cpu + [item]
            else:
                d, c = device + [item], [i for i in cpu if i is not item]
            span = _makespan(d, c, costs, backlog)
            if span < best - 1e-12:
                device, cpu, best, improved = d, c, span, True
                break
    return device, cpu


def plan_layer(loads: Sequence[ExpertLoad], costs: Costs | None, cpu_experts: str = "auto", copy_backlog_s: float = 0.0,
               refine: bool = True) -> Plan:
    """Place each expert of one layer; ``cpu_experts`` 'never' copies every miss, 'always' runs every miss on the CPU.
    ``refine=False`` stops after HybriMoE's greedy (for comparison)."""
    if cpu_experts not in CPU_EXPERTS:
        raise ValueError(f"cpu_experts must be one of {CPU_EXPERTS}, got {cpu_experts!r}")
    loads = [i for i in loads if i.tokens > 0]
    if cpu_experts == "never":
        device, cpu = list(loads), []
    elif cpu_experts == "always":
        device, cpu = [i for i in loads if i.resident], [i for i in loads if not i.resident]
    else:
        device, cpu = _greedy(list(loads), costs, copy_backlog_s)
        if refine:
            device, cpu = _improve(device, cpu, costs, copy_backlog_s)
    placement = {i.expert: (RESIDENT if i.resident else COPY) for i in device} | {i.expert: CPU for i in cpu}
    finish = float("nan") if costs is None else _makespan(device, cpu, costs, copy_backlog_s)
    return Plan(placement, finish)


class PlanMemo:
    """``plan_layer`` for one cost model and miss placement, remembered by its inputs: a layer call's plan
    depends only on its loads and the link's backlog, which recur (decode calls of the same shape), so a
    repeated one is looked up, not searched again. Holds at most ``size`` plans (then starts afresh)."""

    def __init__(self, costs: Costs | None, cpu_experts: str, size: int = 1 << 16):
        self.costs = costs
        self.cpu_experts = cpu_experts
        self.size = size
        self._plans: dict[tuple, Plan] = {}

    def plan(self, loads: Sequence[ExpertLoad], copy_backlog_s: float = 0.0) -> Plan:
        key = (tuple(loads), copy_backlog_s)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.size:
                self._plans.clear()
            plan = self._plans[key] = plan_layer(loads, self.costs, self.cpu_experts, copy_backlog_s)
        return plan
