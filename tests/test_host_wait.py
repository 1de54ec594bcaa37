"""host_wait: how the host waits on its readback events (spin or block) is one setting; outputs never change."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import moe_offload
from moe_offload.errors import MoEOffloadError
from moe_offload.loading.config import OffloadConfig
from moe_offload.transfer.readback import HOST_WAITS, HostReadback, host_event

from copy_timing import COPY_TIMINGS, greedy, load, reference

TOKENS = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(5))  # [B, S]


def test_host_wait_names_are_checked():
    assert OffloadConfig(device="cpu").host_wait == "spin"          # the default stays CUDA's own event
    with pytest.raises(MoEOffloadError, match="host_wait must be one of spin, block"):
        OffloadConfig(device="cpu", host_wait="sleep")
    with pytest.raises(ValueError, match="host_wait"):
        host_event(torch.device("cpu"), "sleep")
    assert host_event(torch.device("cpu"), "block") is None         # nothing to wait for off CUDA


@pytest.mark.parametrize("timing", COPY_TIMINGS[:2])
def test_switching_host_wait_mid_run_keeps_logits_and_tokens(checkpoints, timing):
    """Every miss on the CPU experts (their input readback and output buffer use the events), the wait
    switched between generations: logits and greedy tokens stay transformers'."""
    path = checkpoints["mixtral"]
    expected, expected_ids = reference(path, TOKENS, 6)
    model = load(path, timing, expert_slots=3, cpu_experts="always", host_wait="block")
    engine = model.offload.engine
    assert engine.host_wait == "block"
    for wait in (*HOST_WAITS, "block"):
        engine.set_host_wait(wait)
        assert engine.host_wait == wait and isinstance(engine.protocol.readback, HostReadback)
        with torch.no_grad():
            assert_close(model(TOKENS).logits, expected, (wait, timing))
        assert torch.equal(model.generate(TOKENS[:, :4], **greedy(6)), expected_ids), (wait, timing)
    assert model.offload.stats.cpu_experts.sum() > 0
    assert engine.protocol.readback.reads > 0                        # the new readback is the one in use


@pytest.mark.cuda
@pytest.mark.parametrize("host_wait", HOST_WAITS)
@pytest.mark.parametrize("mode", ["always", "auto"])
def test_cuda_logits_match_under_either_host_wait(checkpoints, host_wait, mode):
    path = checkpoints["mixtral"]
    expected, expected_ids = reference(path, TOKENS, 6)
    model = moe_offload.from_pretrained(path, device="cuda", dtype=torch.float32, expert_slots=3, cpu_experts=mode,
                                        hardware="rtx4090-pcie4", host_wait=host_wait, progress=False)
    with torch.no_grad():
        assert_close(model(TOKENS.cuda()).logits.cpu(), expected, (host_wait, mode))
    assert torch.equal(model.generate(TOKENS[:, :4].cuda(), **greedy(6)).cpu(), expected_ids), (host_wait, mode)
    if mode == "always":
        assert model.offload.stats.cpu_experts.sum() > 0
    model.offload.close()
