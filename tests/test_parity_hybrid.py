"""Parity with misses on the CPU kernels: cpu_experts never / always / auto, at every budget."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, layer_budgets

from copy_timing import COPY_TIMINGS, greedy, load, reference
from tiny_checkpoints import num_experts

TOKENS = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(3))  # [B, S]
GENERATE = greedy(8)


@pytest.mark.parametrize("timing", COPY_TIMINGS)
@pytest.mark.parametrize(("family", "k"), layer_budgets(["mixtral", "qwen2_moe", "deepseek_v3"]))
@pytest.mark.parametrize("mode", ["never", "always", "auto"])
def test_logits_and_generation_match(checkpoints, family, k, mode, split_profile, timing):
    path = checkpoints[family]
    expected, expected_ids = reference(path, TOKENS, 8)
    model = load(path, timing, expert_slots=k, cpu_experts=mode, hardware=str(split_profile))
    with torch.no_grad():
        assert_close(model(TOKENS).logits, expected, (family, mode, k, timing))
    assert torch.equal(model.generate(TOKENS[:, :4], **GENERATE), expected_ids), (family, mode, k, timing)
    stats = model.offload.stats
    if mode == "never":
        assert stats.cpu_experts.sum() == 0
    if mode == "always":
        assert stats.cpu_experts.sum() == stats.misses.sum() > 0
        assert stats.bytes_copied.sum() == 0
    if mode == "auto" and k < num_experts(family):
        assert 0 < stats.cpu_experts.sum() < stats.misses.sum(), "both CPU runs and copies expected"
    if mode == "auto" and k == num_experts(family):   # CPU runs also fill the slots still free
        assert stats.cpu_fills.sum() > 0
    if mode != "auto":
        assert stats.cpu_fills.sum() == 0
