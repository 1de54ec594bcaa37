"""Dense layers on a CPU-only run in the faster of bf16 and a float32 upcast: the choice, and the law (parity)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from torch import nn
from transformers import AutoModelForCausalLM

import moe_offload
from moe_offload.errors import MoEOffloadError
from moe_offload.runtime.dense_cpu import DenseTiming, UpcastLinear, choose_dense_precision, time_shape

from tiny_checkpoints import FAMILIES

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))  # [B, S]


@pytest.mark.parametrize(("native", "upcast", "rows"), [
    ({1: 2.0, 4: 2.0, 16: 2.0, 64: 2.0}, {1: 1.0, 4: 1.5, 16: 3.0}, 4),   # upcast wins the GEMV, loses at 16
    ({1: 2.0}, {1: 2.5}, 0),                                             # native wins at once: nothing upcast
    ({1: 2.0, 4: 2.0}, {1: 1.0, 4: 2.0}, 1),                             # a tie goes to native
    ({1: 2.0, 4: 2.0, 16: 2.0, 64: 2.0}, {1: 1.0, 4: 1.0, 16: 1.0, 64: 1.0}, 64),
], ids=["gemv-only", "never", "tie", "always"])
def test_upcast_rows_follow_the_timings(native, upcast, rows):
    assert DenseTiming((8, 8), native, upcast).upcast_tokens == rows


@pytest.mark.parametrize(("native", "upcast", "kernel", "rows"), [
    ({1: 2.0, 4: 2.0, 16: 2.0}, {1: 1.5, 4: 1.5, 16: 1.5}, {1: 1.0, 4: 1.0, 16: 3.0}, (4, 16)),
    ({1: 2.0, 4: 2.0}, {1: 1.0, 4: 1.0}, {1: 1.0, 4: 0.5}, (0, 4)),       # a tie with upcast goes to upcast
    ({1: 2.0, 4: 2.0}, {1: 3.0, 4: 3.0}, {1: 1.0, 4: 1.0}, (4, 0)),
], ids=["kernel-gemv", "tie", "kernel-only"])
def test_kernel_rows_follow_the_timings(native, upcast, kernel, rows):
    timing = DenseTiming((8, 8), native, upcast, kernel)
    assert (timing.kernel_tokens, timing.upcast_tokens) == rows


def test_kernel_linear_computes_the_float32_products_of_the_same_weights():
    linear = nn.Linear(96, 40).to(torch.bfloat16)
    layer = UpcastLinear(linear, upcast_tokens=0, kernel_tokens=4)
    assert layer.weight_float32 is None                          # the kernel reads the bf16 weights themselves
    small, large = torch.randn(2, 2, 96).to(torch.bfloat16), torch.randn(8, 96).to(torch.bfloat16)
    upcast = nn.functional.linear(small.float(), linear.weight.float(), linear.bias.float()).to(torch.bfloat16)
    got = layer(small)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 2, 40)
    # the same float32 products, summed in another order, rounded once: at most one bf16 step apart
    assert torch.allclose(got.float(), upcast.float(), rtol=2**-7, atol=1e-6)
    assert (got != upcast).float().mean() < 0.1
    assert torch.equal(layer(large), linear(large))


def test_timing_stops_at_the_first_count_native_wins():
    timing = time_shape(torch.randn(64, 32).to(torch.bfloat16), tokens=(1, 4, 16, 64))
    counts = sorted(timing.native_s)
    assert counts == sorted(timing.upcast_s) and counts == [1, 4, 16, 64][: len(counts)]
    assert all(timing.upcast_s[t] < timing.native_s[t] for t in counts[:-1])
    assert timing.upcast_tokens in (0, *counts)


def test_upcast_linear_runs_float32_up_to_its_rows_and_native_above():
    linear = nn.Linear(32, 16).to(torch.bfloat16)
    layer = UpcastLinear(linear, upcast_tokens=4)
    assert layer.weight is linear.weight and "weight_float32" not in layer.state_dict()
    small, large = torch.randn(2, 2, 32).to(torch.bfloat16), torch.randn(8, 32).to(torch.bfloat16)
    exact = nn.functional.linear(small.float(), linear.weight.float(), linear.bias.float()).to(torch.bfloat16)
    assert torch.equal(layer(small), exact)
    assert torch.equal(layer(large), linear(large))


@pytest.mark.parametrize("mode", ["float32", "kernel", "auto", "native"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_logits_match_transformers_in_every_dense_mode(checkpoints, family, mode):
    """The law with the dense layers upcast (all, measured, none), under late out-of-order copies."""
    path = checkpoints[family]
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_implementation="eager").eval()
    model = moe_offload.from_pretrained(path, device="cpu", dtype="bf16", expert_slots=2, progress=False,
                                        cpu_dense=mode, copy_backend="deferred", copy_seed=1)
    upcast = [m for m in model.modules() if isinstance(m, UpcastLinear)]
    plain = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16]
    if mode in ("float32", "kernel"):
        assert upcast and not plain
        assert all((m.kernel_tokens > 0) == (mode == "kernel") for m in upcast)
    if mode == "native":
        assert not upcast
    with torch.no_grad():
        assert_close(model(TOKENS).logits, eager(TOKENS).logits, f"{family} bf16, cpu_dense={mode}")


def test_float32_models_are_left_alone():
    model = nn.Sequential(nn.Linear(8, 8))
    assert choose_dense_precision(model, torch.float32, "float32") == {}
    assert type(model[0]) is nn.Linear


def test_bad_cpu_dense_names_the_choices():
    with pytest.raises(MoEOffloadError, match="cpu_dense must be one of auto, native, float32, kernel"):
        moe_offload.OffloadConfig(device="cpu", cpu_dense="fp16")


def test_a_measured_choice_is_kept_per_machine_and_shape(monkeypatch, tmp_path):
    """The first load times a shape; later loads read the kept choice; a corrupt file is timed again."""
    from moe_offload.runtime import dense_cpu

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    timed = []

    def fake_timing(weight, tokens=dense_cpu.TOKEN_COUNTS):
        timed.append(tuple(weight.shape))
        return DenseTiming(tuple(weight.shape), {1: 2.0, 4: 2.0}, {1: 1.5, 4: 3.0}, {1: 1.0, 4: 3.0})

    monkeypatch.setattr(dense_cpu, "time_shape", fake_timing)
    weight = torch.zeros(24, 16, dtype=torch.bfloat16)
    assert dense_cpu.measured_choice(weight) == (1, 1) and timed == [(24, 16)]
    assert dense_cpu.measured_choice(weight) == (1, 1) and timed == [(24, 16)]          # read, not timed
    assert dense_cpu.measured_choice(torch.zeros(24, 8, dtype=torch.bfloat16)) == (1, 1)  # another shape: timed
    assert timed == [(24, 16), (24, 8)]
    (kept,) = [p for p in (tmp_path / "moe-offload" / "dense").iterdir() if "24, 16" in p.read_text()]
    kept.write_text("{not json")
    assert dense_cpu.measured_choice(weight) == (1, 1) and timed[-1] == (24, 16) and len(timed) == 3
