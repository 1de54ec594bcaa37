"""CPU expert kernels vs a float64 torch reference: formats x tokens x shapes x activations."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_offload.cpu_kernels import (
    CpuJob,
    CpuRunner,
    as_numpy_block,
    dequantize_block_int8,
    expert_ffn,
    quantize_block_int8,
)
from moe_offload.cpu_kernels.workspace import Workspace

# T = tokens, H = hidden, I = intermediate
SHAPES = [(64, 96), (72, 40), (130, 257), (33, 7)]  # (H, I); ragged vs the 8-wide vectors
TOKENS = [1, 3, 16, 64]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda v: F.gelu(v, approximate="tanh"),
}
# Max abs error / max |reference|. Weights are widened exactly, so all formats share the
# float32-accumulation error (~sqrt(K) * 2^-24 relative, measured <= 3e-7 here); the bounds leave ~10x headroom.
TOLERANCE = {torch.float32: 3e-6, torch.float16: 3e-6, torch.bfloat16: 3e-6}
# int8 per-row quantisation vs the unquantised result: relative L2 error bound (Gaussian weights).
INT8_REL_L2_BOUND = 0.02


def make_block(hidden: int, inter: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random expert block [3IH] with weights ~ N(0, 1/K) so outputs stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(2 * inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(hidden, inter, generator=gen) / inter**0.5
    return torch.cat([gate_up.reshape(-1), down.reshape(-1)]).to(dtype)


def make_tokens(tokens: int, hidden: int, seed: int = 1) -> torch.Tensor:
    """x [T, H] float32 ~ N(0, 1)."""
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))


def reference(x: torch.Tensor, block: torch.Tensor, hidden: int, inter: int, act: str) -> torch.Tensor:
    """float64 torch reference of the gated expert FFN; returns [T, H] float64."""
    weights = block.double()
    gate_up = weights[: 2 * inter * hidden].reshape(2 * inter, hidden)
    down = weights[2 * inter * hidden :].reshape(hidden, inter)
    g, u = F.linear(x.double(), gate_up).chunk(2, -1)
    return F.linear(ACTS[act](g) * u, down)


def run_kernel(x: torch.Tensor, block: np.ndarray, hidden: int, inter: int, act: str, scales=None):
    """expert_ffn with fresh out/scratch buffers; returns out [T, H] float32 as torch."""
    out = np.full((x.shape[0], hidden), np.nan, dtype=np.float32)
    scratch = np.empty(x.shape[0] * inter, dtype=np.float32)
    expert_ffn(x.numpy(), block, hidden, inter, act, out, scratch, scales)
    return torch.from_numpy(out)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |actual - expected| <= tol * max |expected| (absolute tolerance scaled to the output)."""
    atol = tol * float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected, rtol=0.0, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_expert_ffn_matches_reference(dtype, tokens, shape):
    hidden, inter = shape
    block = make_block(hidden, inter, dtype)
    x = make_tokens(tokens, hidden)
    for act in ACTS:
        actual = run_kernel(x, as_numpy_block(block), hidden, inter, act)
        assert_close_scaled(actual, reference(x, block, hidden, inter, act), TOLERANCE[dtype])


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_kernel_matches_dequantized_reference(tokens, shape):
    hidden, inter = shape
    block = make_block(hidden, inter, torch.bfloat16)
    q, scales = quantize_block_int8(as_numpy_block(block), hidden, inter)
    dequant = torch.from_numpy(dequantize_block_int8(q, scales, hidden, inter))
    x = make_tokens(tokens, hidden)
    actual = run_kernel(x, q, hidden, inter, "silu", scales)
    assert_close_scaled(actual, reference(x, dequant, hidden, inter, "silu"), 3e-6)


@pytest.mark.parametrize("tokens", [1, 16])
def test_int8_error_within_bound(tokens):
    hidden, inter = 256, 512
    block = make_block(hidden, inter, torch.bfloat16, seed=3)
    q, scales = quantize_block_int8(as_numpy_block(block), hidden, inter)
    x = make_tokens(tokens, hidden, seed=4)
    actual = run_kernel(x, q, hidden, inter, "silu", scales).double()
    expected = reference(x, block, hidden, inter, "silu")
    rel_l2 = float((actual - expected).norm() / expected.norm())
    assert rel_l2 < INT8_REL_L2_BOUND


def test_quantization_round_trip_error_per_row():
    hidden, inter = 72, 40
    block = make_block(hidden, inter, torch.float32)
    q, scales = quantize_block_int8(block.numpy(), hidden, inter)
    dequant = dequantize_block_int8(q, scales, hidden, inter)
    rows = np.concatenate([np.repeat(scales[: 2 * inter], hidden), np.repeat(scales[2 * inter :], inter)])
    assert np.all(np.abs(dequant - block.numpy()) <= rows / 2 * (1 + 1e-5) + 1e-12)


def test_out_of_range_inputs_propagate_inf_and_nan():
    hidden, inter = 16, 8
    block = make_block(hidden, inter, torch.float32).numpy().copy()
    x = make_tokens(1, hidden)
    x[0, 0] = float("nan")
    out = run_kernel(x, block, hidden, inter, "silu")
    assert torch.isnan(out).all()


@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_runner_weighted_sum_matches_index_add(tokens):
    hidden, inter = 72, 40
    x = make_tokens(tokens, hidden)
    formats = [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    blocks = [make_block(hidden, inter, dtype, seed=10 + e) for e, dtype in enumerate(formats)]
    gen = torch.Generator().manual_seed(5)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    jobs = []
    for e, block in enumerate(blocks):
        rows = torch.randperm(tokens, generator=gen)[: max(1, tokens // 2 + e % 2)]
        weights = torch.rand(rows.numel(), generator=gen)
        y = reference(x[rows], block, hidden, inter, "silu")
        expected.index_add_(0, rows, weights.double()[:, None] * y)
        jobs.append(CpuJob(as_numpy_block(block), rows.numpy(), weights.numpy(), "silu"))
    q, scales = quantize_block_int8(as_numpy_block(blocks[0]), hidden, inter)
    rows = np.array([tokens - 1])
    jobs.append(CpuJob(q, rows, np.array([0.5], np.float32), "silu", scales))
    deq = torch.from_numpy(dequantize_block_int8(q, scales, hidden, inter))
    expected[tokens - 1] += 0.5 * reference(x[rows], deq, hidden, inter, "silu")[0]
    with CpuRunner(num_threads=1) as runner:
        out = torch.full((tokens, hidden), float("nan"))
        result = runner.submit(x, jobs, out=out).result()
        again = runner.run(x.numpy(), jobs)
    assert result is out
    assert_close_scaled(out, expected, 3e-6)
    np.testing.assert_array_equal(again, out.numpy())


def test_runner_warmup_and_thread_count():
    with CpuRunner(num_threads=1) as runner:
        runner.warmup(dtypes=("float32", "float16", "bfloat16"), acts=tuple(ACTS), int8=True)
        assert runner.num_threads == 1
        with pytest.raises(ValueError, match="num_threads"):
            runner.set_num_threads(10_000)


@pytest.mark.parametrize("tokens", [1, 64])
def test_no_buffer_allocation_per_call(tokens):
    hidden, inter = 256, 512  # scratch alone would be tokens * 2 KiB
    block = as_numpy_block(make_block(hidden, inter, torch.bfloat16))
    x = make_tokens(tokens, hidden).numpy()
    out = np.empty_like(x)
    scratch = np.empty(tokens * inter, np.float32)
    job = CpuJob(block, np.arange(tokens), np.ones(tokens, np.float32))
    with CpuRunner(num_threads=1) as runner:
        expert_ffn(x, block, hidden, inter, "silu", out, scratch)
        runner.run(x, [job], out=out)
        tracemalloc.start()
        for _ in range(10):
            expert_ffn(x, block, hidden, inter, "silu", out, scratch)
            runner.run(x, [job], out=out)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 16 * 1024


def test_workspace_reuses_buffers():
    ws = Workspace()
    first = ws.get("h", 4, 32)
    second = ws.get("h", 2, 16)
    assert np.shares_memory(first, second)
    assert ws.get("h", 8, 32).size == 256


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "x": a["x"].astype(np.float64)}, "x must be a float32"),
        (lambda a: {**a, "x": a["x"][:, :-1].copy()}, "shape"),
        (lambda a: {**a, "block": a["block"][:-1]}, "elements"),
        (lambda a: {**a, "block": a["block"].astype(np.int32)}, "dtype"),
        (lambda a: {**a, "out": a["out"][:1]}, "rows"),
        (lambda a: {**a, "scratch": a["scratch"][:3]}, "scratch"),
        (lambda a: {**a, "act": "relu"}, "activation"),
        (lambda a: {**a, "act": 7}, "activation code"),
        (lambda a: {**a, "scales": np.ones(3, np.float32)}, "int8"),
    ],
)
def test_bad_input_raises_value_error(change, message):
    hidden, inter = 16, 8
    args = {
        "x": np.ones((2, hidden), np.float32),
        "block": np.ones(3 * hidden * inter, np.float32),
        "hidden": hidden,
        "inter": inter,
        "act": "silu",
        "out": np.empty((2, hidden), np.float32),
        "scratch": np.empty(2 * inter, np.float32),
    }
    with pytest.raises(ValueError, match=message):
        expert_ffn(**change(args))


@pytest.mark.parametrize(
    "job, message",
    [
        (CpuJob(np.ones(384, np.float32), np.array([5]), np.array([1.0], np.float32)), "rows"),
        (CpuJob(np.ones(384, np.float32), np.array([0, 1]), np.array([1.0], np.float32)), "weights"),
        (CpuJob(np.ones(384, np.int8), np.array([0]), np.array([1.0], np.float32)), "scales"),
        (CpuJob(np.ones(383, np.float32), np.array([0]), np.array([1.0], np.float32)), "3 \\* H \\* I"),
    ],
)
def test_runner_rejects_bad_jobs_in_the_caller(job, message):
    hidden = 16  # 384 = 3 * 16 * 8
    with CpuRunner(num_threads=1) as runner, pytest.raises(ValueError, match=message):
        runner.submit(np.ones((2, hidden), np.float32), [job])
