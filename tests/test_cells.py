"""A grid of simulations gives the same results, cell for cell, inline, on a process pool and on a local Ray."""

from __future__ import annotations

import os

import pytest

from moe_offload.predictor.synthetic import SyntheticTraceConfig, synthetic_trace
from moe_offload.runtime.cost import CostModel, HardwareProfile
from moe_offload.simulate.cells import Cell, Replay, run_cells

TRACE = synthetic_trace(SyntheticTraceConfig(tokens=24, layers=4, experts=8, top_k=2, skew=0.3, repeat=0.1,
                                             tokens_per_sequence=12, prompt_tokens=4, seed=1))
COST = CostModel.for_expert(HardwareProfile.from_yaml("rtx4090-pcie4"), 4096, 14336, 2)
REPLAY = Replay(TRACE, COST, COST.bytes_per_expert)
CELLS = [Cell("score", 8), Cell("lru", 12, cpu_experts="never"), Cell("score", 8, predictor="oracle", prefetch_depth=2),
         Cell("belady", 8, predictor="oracle@0.8", prefetch_depth=1), Cell("lru", 8, host_rows=16),
         Cell("arc", 8, "uniform", predictor="oracle", prefetch_depth=3, host_rows=20)]


@pytest.fixture(scope="module")
def inline():
    return run_cells(REPLAY, CELLS, workers=1, progress=False)


def test_the_process_pool_gives_the_inline_results(inline):
    assert run_cells(REPLAY, CELLS, workers=2, progress=False) == inline
    assert len({r.tokens_per_s for r in inline}) == len(CELLS)   # the cells differ: order matters


def test_a_local_ray_gives_the_inline_results(inline):
    if not os.environ.get("CI"):        # the test extra installs ray; CI must run this, never skip it
        pytest.importorskip("ray")
    assert run_cells(REPLAY, CELLS, ray_address="", progress=False) == inline
