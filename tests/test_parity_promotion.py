"""Promotion and budgeted prefetch in the engine keep the law, under every copy timing.

With a cost model (cpu_experts='auto') the engine follows the simulator's rules: CPU-run experts are
promoted into the cache while the link is idle, evicting only less likely experts, and prefetches are
issued only when they fit the link time before their layer. Those copies change what is resident,
never the outputs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from moe_offload.runtime.cost import HardwareProfile

from copy_timing import COPY_TIMINGS, greedy, load, reference
from tiny_checkpoints import num_experts

TOKENS = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(5))  # [B, S]
GENERATE = greedy(10)


@pytest.fixture(scope="module")
def cpu_decode_profile(tmp_path_factory):
    """Costs under which a 1-token miss runs on the CPU while its copy would take longer: decode as on a GPU
    box whose link is slower than its CPU."""
    profile = HardwareProfile(name="cpu-decode", h2d_gbps=0.05, copy_latency_us=0.0, gpu_mem_gbps=1000.0,
                              gpu_tflops=1000.0, gpu_launch_us=0.0, cpu_mem_gbps=1.0, cpu_gflops=0.05,
                              cpu_start_us=0.0)
    return profile.to_yaml(tmp_path_factory.mktemp("hw") / "cpu-decode.yaml")


@pytest.mark.parametrize("timing", COPY_TIMINGS)
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("predictor", ["none", "previous"])
def test_promotion_and_budgeted_prefetch_keep_logits_and_tokens(checkpoints, family, predictor, timing,
                                                                 cpu_decode_profile):
    path = checkpoints[family]
    expected, expected_ids = reference(path, TOKENS, 10)
    model = load(path, timing, expert_slots=num_experts(family) // 2, cpu_experts="auto",
                 hardware=str(cpu_decode_profile), predictor=predictor, prefetch_depth=2)
    with torch.no_grad():
        assert_close(model(TOKENS).logits, expected, (family, predictor, timing))
    assert torch.equal(model.generate(TOKENS[:, :4], **GENERATE), expected_ids), (family, predictor, timing)
    stats = model.offload.stats
    assert stats.cpu_experts.sum() > 0 and stats.promotions.sum() > 0, "decode misses run on the CPU and promote"
    assert stats.evictions.sum() > 0
