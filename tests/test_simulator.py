"""The trace-driven cache simulator: same decisions as the runtime, Belady as the bound, the time model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_offload
from moe_offload.cache import POLICIES
from moe_offload.predictor import make_predictor
from moe_offload.predictor.synthetic import SyntheticTraceConfig, synthetic_trace
from moe_offload.runtime.scheduler import ExpertLoad, plan_layer
from moe_offload.runtime.tracing import TraceRecorder
from moe_offload.simulate import RoutingArrays, Simulator, call_spans

PROMPTS = [torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 5)]  # [1, S]


def run_engine(path, **fields):
    """Greedy generation from PROMPTS on CPU; returns (stats, recorded routing)."""
    model = moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False, **fields)
    recorder = TraceRecorder(len(model.offload.moe_layers), gate_inputs=False, scores_dtype=torch.float32)
    model.offload.router_tap.add(recorder)
    for ids in PROMPTS:
        model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        recorder.next_sequence()
    return model.offload.stats, RoutingArrays.of(recorder.trace({}))


CASES = [  # (family, slots, allocation); mixtral: 3 MoE layers x 8 experts, deepseek_v3: 2 x 8
    ("mixtral", 1, "global"), ("mixtral", 5, "global"), ("mixtral", 4, "uniform"),
    ("deepseek_v3", 3, "global"), ("deepseek_v3", 5, "uniform"),
]
CASE_IDS = [f"{family}-{slots}slot{'s' * (slots > 1)}-{allocation}" for family, slots, allocation in CASES]


@pytest.mark.parametrize(("family", "slots", "allocation"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_simulator_matches_the_engine(checkpoints, family, slots, allocation, policy):
    stats, routing = run_engine(checkpoints[family], expert_slots=slots, cache_policy=policy,
                                slot_allocation=allocation)
    result = Simulator(routing).run(policy, slots, allocation)
    where = (family, policy, slots, allocation)
    assert result.hits_per_layer == tuple(stats.hits.tolist()), where
    assert result.misses_per_layer == tuple(stats.misses.tolist()), where
    assert result.hit_rate == pytest.approx(stats.hit_rate)


def random_routing(seed: int, tokens=300, layers=3, experts=8, k=2) -> RoutingArrays:
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(experts, 0.5), size=layers)             # [L, E] skewed per layer
    ids = np.stack([[rng.choice(experts, k, replace=False, p=w) for w in weights] for _ in range(tokens)])
    probs = rng.dirichlet(np.ones(experts), size=(tokens, layers))           # [N, L, E]
    sequence = np.arange(tokens) // 100
    decode = (np.arange(tokens) % 100) >= 4                                  # 4-token prompts
    return RoutingArrays(ids, probs, sequence, decode)


@pytest.mark.parametrize("seed", range(4))
def test_belady_bounds_every_policy(seed):
    simulator = Simulator(random_routing(seed))
    for slots, allocation in [(4, "global"), (8, "global"), (14, "global"), (6, "uniform"), (12, "uniform")]:
        bound = simulator.run("belady", slots, allocation).hits
        for policy in POLICIES:
            assert simulator.run(policy, slots, allocation).hits <= bound, (policy, slots, allocation)


def test_score_beats_lru_on_a_skewed_trace():
    trace = synthetic_trace(SyntheticTraceConfig(tokens=1000, layers=6, experts=32, top_k=4, skew=1.0, repeat=0.3))
    simulator = Simulator(RoutingArrays.of(trace))
    for slots in (48, 96):   # 25% and 50% of the experts
        for allocation in ("global", "uniform"):
            score = simulator.run("score", slots, allocation).hit_rate
            lru = simulator.run("lru", slots, allocation).hit_rate
            assert score >= lru, (slots, allocation, score, lru)


def test_call_spans_follow_the_runtime():
    sequence = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    decode = np.array([0, 0, 1, 1, 0, 0, 1, 1], bool)
    # prompt of seq 0 is one call, then one call per generated token; seq 2 has no prompt
    assert call_spans(sequence, decode).tolist() == [[0, 2], [2, 3], [3, 4], [4, 6], [6, 7], [7, 8]]


class UnitCost:
    """copy 1 s, device 0.5 s per expert call, CPU 2 s."""

    def copy_s(self):
        return 1.0

    def gpu_s(self, tokens):
        return 0.5

    def cpu_s(self, tokens):
        return 2.0


def test_copying_every_miss_overlaps_copies_with_resident_compute():
    loads = [ExpertLoad(e, 1, resident=e % 2 == 0) for e in range(4)]
    plan = plan_layer(loads, UnitCost(), "never")
    # hits run first (0.5 + 0.5 = 1.0); miss 1 lands at 1.0 -> ends 1.5; miss 2 lands at 2.0 -> ends 2.5
    assert plan.experts("resident") + plan.experts("copy") == [0, 2, 1, 3] and plan.finish_s == 2.5


def test_simulated_time_bytes_and_tokens_per_s():
    ids = np.array([[[0]], [[1]], [[0]]])                                   # [N=3, L=1, k=1]
    routing = RoutingArrays(ids, None, np.zeros(3, int), np.ones(3, bool), num_experts=2)
    result = Simulator(routing, UnitCost(), bytes_per_expert=100).run("lru", 1)
    # 0 miss (1.5 s), 1 miss evicts 0 (1.5 s), 0 miss (1.5 s)
    assert (result.hits, result.misses, result.bytes_copied) == (0, 3, 300)
    assert result.seconds == pytest.approx(4.5) and result.tokens_per_s == pytest.approx(3 / 4.5)
    assert result.bytes_copied_per_token == 100


def test_misses_run_on_the_cpu_never_enter_the_cache():
    result = Simulator(random_routing(0), cpu_experts="always").run("lru", 8)
    assert result.hits == 0 and result.copies == 0 and result.misses > 0 and result.bytes_copied == 0


def test_predicted_shares_reach_the_policy_one_layer_ahead():
    trace = synthetic_trace(SyntheticTraceConfig(tokens=60, layers=3, experts=8, top_k=2))
    routing = RoutingArrays.of(trace)
    hints = []
    simulator = Simulator(routing, predictor=lambda: make_predictor("oracle", replay_trace=trace))
    policy = simulator.make_policy("score")
    policy.hint = lambda layer, shares: hints.append((layer, shares.shape))
    simulator.run(policy, 6)
    assert sorted(set(hints)) == [(1, (8,)), (2, (8,))] and len(hints) == 2 * len(routing.spans())
    plain = Simulator(routing).run("score", 6)
    oracle = simulator.run("score", 6)
    assert oracle.hits > plain.hits and oracle.prefetch_used == oracle.prefetch_copies > 0
