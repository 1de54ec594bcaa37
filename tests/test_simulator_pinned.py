"""Projected tokens/s and counts of the simulator, pinned to the values it gave before its per-call overhead
was removed: a faster replay must give the same numbers, to the last digit that matters."""

from __future__ import annotations

import pytest

from moe_offload.predictor import make_predictor
from moe_offload.predictor.synthetic import SyntheticTraceConfig, synthetic_trace
from moe_offload.runtime.cost import CostModel, HardwareProfile
from moe_offload.simulate import RoutingArrays, Simulator

# A synthetic trace of 10 MoE layers x 8 experts, top-2: 3 sequences of 16 tokens, the first 6 of each a prompt
# (so prefill calls of several tokens and decode calls of one), costed as Mixtral-8x7B experts on an RTX 4090.
TRACE = synthetic_trace(SyntheticTraceConfig(tokens=48, layers=10, experts=8, top_k=2, skew=0.3, repeat=0.1,
                                             tokens_per_sequence=16, prompt_tokens=6, seed=3))
COST = CostModel.for_expert(HardwareProfile.from_yaml("rtx4090-pcie4"), 4096, 14336, 2)

# (policy, slots, allocation, cpu_experts, predictor, depth, host rows): the cases pinned
CASES = {
    "score-never": ("score", 20, "global", "never", None, 1, None),
    "lru-auto": ("lru", 20, "global", "auto", None, 1, None),
    "arc-auto-uniform": ("arc", 30, "uniform", "auto", None, 1, None),
    "score-auto-oracle-d1": ("score", 20, "global", "auto", "oracle", 1, None),
    "score-auto-oracle-d8": ("score", 20, "global", "auto", "oracle", 8, None),
    "lru-never-oracle0.8-d8": ("lru", 20, "global", "never", "oracle@0.8", 8, None),
    "belady-auto-oracle-d8": ("belady", 20, "global", "auto", "oracle", 8, None),
    "frequency-auto-oracle0.8-d2": ("frequency", 40, "global", "auto", "oracle@0.8", 2, None),
    "score-auto-oracle-d8-disk": ("score", 20, "global", "auto", "oracle", 8, 40),
    "lru-never-disk": ("lru", 20, "global", "never", None, 1, 24),
}

FIELDS = ("tokens_per_s", "hits", "misses", "copies", "prefetch_copies", "prefetch_used", "promotions",
          "cpu_fills", "disk_reads", "disk_prefetches")

# recorded from the simulator before its speed-up (python tests/test_simulator_pinned.py prints them)
PINNED = {
    'score-never': {'tokens_per_s': 5.77391483757774, 'hits': 207, 'misses': 578, 'copies': 578, 'prefetch_copies': 0, 'prefetch_used': 0, 'promotions': 0, 'cpu_fills': 0, 'disk_reads': 0, 'disk_prefetches': 0},
    'lru-auto': {'tokens_per_s': 14.113912692947753, 'hits': 176, 'misses': 609, 'copies': 47, 'prefetch_copies': 0, 'prefetch_used': 0, 'promotions': 115, 'cpu_fills': 14, 'disk_reads': 0, 'disk_prefetches': 0},
    'arc-auto-uniform': {'tokens_per_s': 17.559267434787934, 'hits': 300, 'misses': 485, 'copies': 37, 'prefetch_copies': 0, 'prefetch_used': 0, 'promotions': 84, 'cpu_fills': 13, 'disk_reads': 0, 'disk_prefetches': 0},
    'score-auto-oracle-d1': {'tokens_per_s': 15.682715364678455, 'hits': 241, 'misses': 544, 'copies': 40, 'prefetch_copies': 40, 'prefetch_used': 40, 'promotions': 78, 'cpu_fills': 14, 'disk_reads': 0, 'disk_prefetches': 0},
    'score-auto-oracle-d8': {'tokens_per_s': 17.17299764053811, 'hits': 288, 'misses': 497, 'copies': 41, 'prefetch_copies': 115, 'prefetch_used': 115, 'promotions': 21, 'cpu_fills': 14, 'disk_reads': 0, 'disk_prefetches': 0},
    'lru-never-oracle0.8-d8': {'tokens_per_s': 5.061785698942053, 'hits': 159, 'misses': 626, 'copies': 626, 'prefetch_copies': 47, 'prefetch_used': 39, 'promotions': 0, 'cpu_fills': 0, 'disk_reads': 0, 'disk_prefetches': 0},
    'belady-auto-oracle-d8': {'tokens_per_s': 19.126284351511316, 'hits': 344, 'misses': 441, 'copies': 40, 'prefetch_copies': 96, 'prefetch_used': 96, 'promotions': 20, 'cpu_fills': 14, 'disk_reads': 0, 'disk_prefetches': 0},
    'frequency-auto-oracle0.8-d2': {'tokens_per_s': 21.91294717264926, 'hits': 424, 'misses': 361, 'copies': 29, 'prefetch_copies': 33, 'prefetch_used': 24, 'promotions': 46, 'cpu_fills': 29, 'disk_reads': 0, 'disk_prefetches': 0},
    'score-auto-oracle-d8-disk': {'tokens_per_s': 3.7697195164287205, 'hits': 336, 'misses': 449, 'copies': 168, 'prefetch_copies': 175, 'prefetch_used': 157, 'promotions': 50, 'cpu_fills': 8, 'disk_reads': 465, 'disk_prefetches': 369},
    'lru-never-disk': {'tokens_per_s': 1.4077673179077224, 'hits': 209, 'misses': 576, 'copies': 576, 'prefetch_copies': 0, 'prefetch_used': 0, 'promotions': 0, 'cpu_fills': 0, 'disk_reads': 550, 'disk_prefetches': 0},
}


def simulate(case: str):
    policy, slots, allocation, cpu_experts, predictor, depth, host_rows = CASES[case]
    maker = None if predictor is None else (lambda: make_predictor(predictor, replay_trace=TRACE))
    simulator = Simulator(RoutingArrays.of(TRACE), COST, COST.bytes_per_expert, cpu_experts, predictor=maker,
                          prefetch_depth=depth, host_rows=host_rows)
    return simulator.run(policy, slots, allocation)


@pytest.mark.parametrize("case", list(CASES))
def test_projection_is_pinned(case):
    result = simulate(case)
    expected = PINNED[case]
    assert result.tokens_per_s == pytest.approx(expected["tokens_per_s"], rel=1e-9)
    assert {f: getattr(result, f) for f in FIELDS[1:]} == {f: expected[f] for f in FIELDS[1:]}


if __name__ == "__main__":
    for name in CASES:
        r = simulate(name)
        print(f"    {name!r}: {{" + ", ".join(f"{f!r}: {getattr(r, f)!r}" for f in FIELDS) + "},")
