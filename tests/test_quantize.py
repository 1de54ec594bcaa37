"""The Numba quantizers against packed.py's torch quantizers (the device path and the parity reference's).

int8 and the int4 fit's least-squares steps are the same float32 arithmetic in both: equal bit for bit.
HQQ steps sum in another order: a zero point may land on the neighbouring float16 in rare groups.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_offload
from moe_offload.cpu_kernels.packed import (
    INT4_FIT,
    ExpertFormat,
    Int4Fit,
    _stored_bits,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
)
from moe_offload.cpu_kernels.quantize_kernels import int4_rows, int8_rows

SHAPES = [(8, 64), (5, 200), (16, 256)]        # (R, K); K = 200: a short last int4 group of 8 columns
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weights(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """N(0, 0.02) with one all-zero row and one heavy outlier per matrix."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[1] = 0.0
    w[0, 3] = 0.5
    return w.to(dtype)


def numba_int4(w: torch.Tensor, group: int, fit: Int4Fit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    groups = -(-cols // group)
    q, scale, zero = np.empty((rows, cols // 2), np.uint8), np.empty((rows, groups), np.int16), \
        np.empty((rows, groups), np.int16)
    int4_rows(_stored_bits(w), group, fit.ls_steps, fit.hqq_steps, q, scale, zero)
    return torch.from_numpy(q), torch.from_numpy(scale).view(torch.float16), torch.from_numpy(zero).view(torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_equals_torch_bit_for_bit(shape, dtype):
    w = weights(shape, dtype)
    q, scale = np.empty(shape, np.int8), np.empty(shape[0], np.float32)
    int8_rows(_stored_bits(w), q, scale)
    expected_q, expected_scale = quantize_int8(w.float())
    assert torch.equal(torch.from_numpy(q), expected_q)
    assert torch.equal(torch.from_numpy(scale), expected_scale)


@pytest.mark.parametrize("fit", [Int4Fit(0, 0), Int4Fit(1, 0), Int4Fit(3, 0), INT4_FIT], ids=str)
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int4_least_squares_equals_torch_bit_for_bit(shape, dtype, group, fit):
    w = weights(shape, dtype)
    got = numba_int4(w, group, fit)
    expected = quantize_int4(w.float(), group, fit)
    for a, b, what in zip(got, expected, ("codes", "scales", "zeros")):
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.float16 else a,
                           b.view(torch.int16) if b.dtype == torch.float16 else b), what


@pytest.mark.parametrize("fit", [Int4Fit(0, 2), Int4Fit(2, 3)], ids=str)
def test_int4_hqq_steps_match_torch_but_for_rare_groups(fit):
    w = weights((64, 1024), torch.bfloat16, seed=1)
    q, scale, zero = numba_int4(w, 64, fit)
    tq, tscale, tzero = quantize_int4(w.float(), 64, fit)
    assert torch.equal(scale, tscale)
    assert (zero == tzero).float().mean() > 0.99
    got, expected = dequantize_int4(q, scale, zero, 64), dequantize_int4(tq, tscale, tzero, 64)
    err, expected_err = (got - w.float()).norm(), (expected - w.float()).norm()
    assert abs(err - expected_err) <= 1e-3 * expected_err


def test_every_refinement_step_lowers_the_error_or_keeps_it():
    """Steps are kept per group only where they lower its squared error: more steps never hurt a group."""
    w = weights((32, 512), torch.float32, seed=2)
    previous = None
    for fit in (Int4Fit(0, 0), Int4Fit(1, 0), Int4Fit(2, 0), Int4Fit(2, 1), Int4Fit(2, 3)):
        deq = dequantize_int4(*numba_int4(w, 64, fit), 64)
        per_group = (deq - w).square().view(32, -1, 64).sum(-1)              # [R, NG]
        if previous is not None:
            assert (per_group <= previous * (1 + 1e-6) + 1e-12).all(), fit
        previous = per_group
    minmax = dequantize_int4(*numba_int4(w, 64, Int4Fit(0, 0)), 64)
    assert (deq - w).norm() < 0.99 * (minmax - w).norm(), "the default steps lower the error measurably"


@pytest.mark.parametrize("name", ["int4", "int4-g128"])
def test_constant_groups_stay_finite_and_exact(name):
    """An all-zero or constant group (pruned weights) dequantizes to itself, never to NaN or inf."""
    fmt = ExpertFormat(name, 256, 128, torch.float32)
    w = torch.zeros(256, 128)
    w[3] = 0.25
    w[5, :] = torch.linspace(-1, 1, 128)
    deq = fmt.dequantized(w, "down")
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[:3], w[:3]) and torch.allclose(deq[3], w[3], rtol=1e-3)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_bf16_weight_is_quantized_as_its_float32_value(name):
    """The CPU path reads bf16 bits as stored; widening is exact, so the row equals the float32 weight's."""
    fmt = ExpertFormat(name, 64, 96, torch.float32)
    w = (torch.randn(192, 64) * 0.02).to(torch.bfloat16)
    rows = [torch.zeros(fmt.row_numel, dtype=fmt.row_dtype) for _ in range(2)]
    fmt.write(rows[0], "gate_up", w)
    fmt.write(rows[1], "gate_up", w.float())
    assert torch.equal(rows[0], rows[1])


def test_loading_progress_counts_experts(checkpoints, tmp_path, capsys):
    moe_offload.from_pretrained(checkpoints["mixtral"], device="cpu", expert_dtype="int4", progress=True,
                                quant_cache=str(tmp_path), cpu_experts="never")
    err = capsys.readouterr().err
    assert "experts -> host (int4)" in err and ("expert/s" in err or "s/expert" in err)
