"""Exact decisions of the hybrid scheduler on hand-made cost models."""

from dataclasses import dataclass

import pytest

from moe_offload.runtime.scheduler import COPY, CPU, RESIDENT, ExpertLoad, plan_layer


@dataclass(frozen=True)
class LinearCosts:
    """copy: fixed; device: a + b*t; CPU: c*t (all in ms, returned in s)."""

    copy_ms: float = 10.0
    gpu_a: float = 0.1
    gpu_b: float = 0.001
    cpu_ms_per_token: float = 2.0

    def copy_s(self):
        return self.copy_ms / 1e3

    def gpu_s(self, tokens):
        return (self.gpu_a + self.gpu_b * tokens) / 1e3 if tokens else 0.0

    def cpu_s(self, tokens):
        return self.cpu_ms_per_token * tokens / 1e3


def test_one_token_miss_goes_to_cpu_when_copy_costs_more():
    plan = plan_layer([ExpertLoad(3, 1, resident=False)], LinearCosts())
    assert plan.placement == {3: CPU}
    assert plan.finish_s == pytest.approx(0.002)


def test_many_token_miss_is_copied():
    plan = plan_layer([ExpertLoad(3, 100, resident=False)], LinearCosts())  # CPU 200 ms vs copy+gpu 10.2 ms
    assert plan.placement == {3: COPY}
    assert plan.finish_s == pytest.approx(0.0102)


def test_resident_stays_on_device_and_misses_split():
    loads = [ExpertLoad(0, 5, True), ExpertLoad(1, 1, False), ExpertLoad(2, 50, False)]
    plan = plan_layer(loads, LinearCosts())
    # expert 2 (50 tokens): CPU 100 ms, copy 10 ms -> copied; expert 1 (1 token): CPU 2 ms beats a second copy
    assert plan.placement == {0: RESIDENT, 1: CPU, 2: COPY}


def test_tie_goes_to_the_device():
    costs = LinearCosts(copy_ms=1.9, gpu_a=0.1, gpu_b=0.0, cpu_ms_per_token=2.0)  # 1.9 + 0.1 == 2.0
    assert plan_layer([ExpertLoad(7, 1, False)], costs).placement == {7: COPY}


def test_empty_layer():
    plan = plan_layer([], LinearCosts())
    assert plan.placement == {} and plan.finish_s == 0.0
    assert plan_layer([ExpertLoad(1, 0, False)], LinearCosts()).placement == {}


def test_modes():
    loads = [ExpertLoad(0, 1, True), ExpertLoad(1, 100, False), ExpertLoad(2, 1, False)]
    assert plan_layer(loads, LinearCosts(), cpu_experts="never").placement == {0: RESIDENT, 1: COPY, 2: COPY}
    assert plan_layer(loads, LinearCosts(), cpu_experts="always").placement == {0: RESIDENT, 1: CPU, 2: CPU}
    with pytest.raises(ValueError):
        plan_layer(loads, LinearCosts(), cpu_experts="sometimes")


def test_copy_backlog_pushes_misses_to_cpu():
    load = [ExpertLoad(4, 3, False)]  # CPU 6 ms; copy 10 ms after a 0 or 20 ms backlog
    costs = LinearCosts(copy_ms=4.0)
    assert plan_layer(load, costs).placement == {4: COPY}
    assert plan_layer(load, costs, copy_backlog_s=0.020).placement == {4: CPU}


def test_improvement_pass_beats_plain_greedy():
    # Greedy gives the lone resident expert's queue front to the device and the
    # back (a 1-token miss) to the CPU, then the 3-token miss to the CPU too
    # (6 ms < copy 10 ms). Moving nothing helps here; check the plan is optimal
    # by brute force over all placements of the misses.
    import itertools

    costs = LinearCosts()
    loads = [ExpertLoad(0, 2, True), ExpertLoad(1, 3, False), ExpertLoad(2, 1, False), ExpertLoad(3, 8, False)]
    plan = plan_layer(loads, costs)
    from moe_offload.runtime.scheduler import _makespan

    best = min(
        _makespan([loads[0]] + [m for m, c in zip(loads[1:], pick) if not c],
                  [m for m, c in zip(loads[1:], pick) if c], costs, 0.0)
        for pick in itertools.product([False, True], repeat=3)
    )
    assert plan.finish_s == pytest.approx(best)
