"""Numba kernels on packed expert rows (int8, int4, int4-g32, int4-g128, fp8, and the "-a8" formats that also
round their activations) vs the torch backend, and the backend choice."""

from __future__ import annotations

import dataclasses
import time
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_offload.cpu_kernels import CpuJob, CpuRunner
from moe_offload.cpu_kernels.act_quant import act_blocks, fake_quantize, quantize_activations, quantize_rows
from moe_offload.cpu_kernels.backends import BUCKETS, MAX_PARAMS, alternated_medians, bucket_of, measured_shape, pick
from moe_offload.cpu_kernels.packed import ExpertFormat
from moe_offload.cpu_kernels.packed_ffn import packed_ffn, packed_scratch_size, row_buffer_width
from moe_offload.cpu_kernels.packed_kernels import FP8_LUT, _fp8_decode_row
from moe_offload.runtime.calibrate import measure_cpu_experts
from moe_offload.runtime.cost import CostModel, HardwareProfile
from moe_offload.transfer import ExpertShape

# T = tokens, H = hidden, I = intermediate
# (H, I) per format: odd where the format allows, never a multiple of the int4 group or the FP8 block; int4 also
# whole blocks of 64 (T = 1 runs the direct int4 dot, compiled without a short block for those widths).
SHAPES = {
    "int8": [(33, 7), (130, 257)],
    "int4": [(130, 200), (66, 34), (128, 192)],
    "int4-g32": [(130, 200), (66, 18)],
    "int4-g128": [(66, 258), (300, 130), (256, 384)],
    "fp8": [(129, 257), (10, 6), (256, 131), (128, 256)],
    # "-a8": activation blocks of 64 whole, short (H or I % 64 != 0) and alone (K < 64)
    "int8-a8": [(33, 7), (130, 257), (128, 192)],
    "int4-a8": [(130, 200), (66, 34), (256, 128)],
    "int4-g128-a8": [(66, 258), (256, 384)],
}
CASES = [(name, shape) for name, shapes in SHAPES.items() for shape in shapes]
TOKENS = [1, 3, 5, 16]
ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda v: F.gelu(v, approximate="tanh")}
# max |kernel - reference| / max |reference|: both accumulate in float32 (measured <= 5e-7).
TOLERANCE = 1e-5


def packed_row(name: str, hidden: int, inter: int, seed: int = 0) -> tuple[ExpertFormat, np.ndarray]:
    """A packed expert of weights ~ N(0, 1/K), quantized by ExpertFormat.write."""
    fmt = ExpertFormat(name, hidden, inter, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    row = torch.zeros(fmt.row_numel, dtype=torch.uint8)
    fmt.write(row, "gate_up", torch.randn(2 * inter, hidden, generator=gen) / hidden**0.5)
    fmt.write(row, "down", torch.randn(hidden, inter, generator=gen) / inter**0.5)
    return fmt, row.numpy()


def reference(fmt: ExpertFormat, row: np.ndarray, x: torch.Tensor, act: str) -> torch.Tensor:
    """What a device expert computes: ExpertFormat.unpack, then ExpertFormat.forward in float32 (F.linear,
    activations rounded by act_quant.fake_quantize for "-a8" formats)."""
    gate_up, down = fmt.unpack(torch.from_numpy(row))
    return fmt.forward(x, gate_up, down, ACTS[act])


def rounding_slack(fmt: ExpertFormat, row: np.ndarray, x: torch.Tensor, act: str, margin: float = 1e-4):
    """[T, 1]: how far an "-a8" kernel may be from the reference beyond float error. The hidden h =
    act(gate) * up is a float result, so where a value lies within ``margin`` of a rounding tie of its code
    the kernel and the reference may pick the two neighbouring codes: one code step (its block's scale)
    times that input's largest down weight, per such value. Zero for other formats and other tokens."""
    if not fmt.act_quant:
        return torch.zeros(x.shape[0], 1)
    gate_up, down = fmt.unpack(torch.from_numpy(row))
    gate, up = torch.nn.functional.linear(fake_quantize(x), gate_up).chunk(2, -1)
    h = ACTS[act](gate) * up                                                            # [T, I]
    _, scale = quantize_activations(h)
    step = scale.repeat_interleave(64, dim=1)[:, : h.shape[1]]                        # [T, I]
    codes = h / step.clamp_min(1e-30)
    near_tie = (codes - codes.floor() - 0.5).abs() <= margin                           # [T, I]
    return (near_tie * step * down.abs().amax(dim=0)).sum(dim=1, keepdim=True)         # [T, 1]


def run_kernel(fmt: ExpertFormat, row: np.ndarray, x: torch.Tensor, act: str, chunks: int = 2) -> torch.Tensor:
    """packed_ffn with fresh buffers (out starts as NaN, so an unwritten element fails)."""
    out = np.full((x.shape[0], fmt.hidden), np.nan, dtype=np.float32)
    scratch = np.empty(packed_scratch_size(fmt, x.shape[0]), dtype=np.float32)
    rows = np.empty((chunks, row_buffer_width(fmt)), dtype=np.float32)
    packed_ffn(x.numpy(), row, fmt, act, out, scratch, rows)
    return torch.from_numpy(out)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOLERANCE) -> None:
    """max |actual - expected| <= tol * max |expected|."""
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("name, shape", CASES, ids=[f"{n}-{h}x{i}" for n, (h, i) in CASES])
def test_packed_kernel_matches_torch_backend(name, shape, tokens):
    fmt, row = packed_row(name, *shape)
    x = torch.randn(tokens, shape[0], generator=torch.Generator().manual_seed(tokens))
    for act in ACTS:
        got, expected = run_kernel(fmt, row, x, act), reference(fmt, row, x, act)
        slack = rounding_slack(fmt, row, x, act)                                       # [T, 1]
        assert ((got - expected).abs() <= TOLERANCE * expected.abs().max() + slack).all(), act
        exact = slack[:, 0] == 0
        if exact.any():
            assert_close_scaled(got[exact], expected[exact])


@pytest.mark.parametrize("width", [1, 63, 64, 130, 256])
@pytest.mark.parametrize("deinterleave", [False, True])
def test_activation_rounding_is_the_torch_reference_bit_for_bit(width, deinterleave):
    """The kernels' quantizer (numba) equals act_quant.quantize_activations: codes, scales, code sums."""
    if deinterleave and width % 2:
        pytest.skip("int4 rows have an even width")
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(4, width, generator=gen) * torch.logspace(-3, 3, 4)[:, None]    # [T, K]
    x[2, :min(width, 64)] = 0.0                                                        # an all-zero block
    x[3, 0] = 1e4                                                                      # an outlier
    q, scale = quantize_activations(x)
    blocks = act_blocks(width)
    codes = np.empty((4, width), np.int16)
    got_scale, sums = np.empty((4, blocks), np.float32), np.empty((4, blocks), np.int32)
    quantize_rows(x.numpy(), codes, got_scale, sums, deinterleave)
    order = torch.cat([torch.arange(0, width, 2), torch.arange(1, width, 2)]) if deinterleave else torch.arange(width)
    assert torch.equal(torch.from_numpy(codes).long(), q.long()[:, order])
    assert torch.equal(torch.from_numpy(got_scale), scale)
    padded = torch.nn.functional.pad(q.long(), (0, blocks * 64 - width))
    assert torch.equal(torch.from_numpy(sums).long(), padded.view(4, blocks, 64).sum(-1))
    assert q.abs().max() <= 127 and torch.equal(q[2, :min(width, 64)], torch.zeros(min(width, 64), dtype=torch.int8))


@pytest.mark.parametrize("name", ["int8-a8", "int4-a8"])
def test_activation_rounding_changes_the_result(name):
    """Control: an "-a8" expert differs from its weight-only twin by far more than the kernel's error, so the
    tests above check the rounding, not a tolerance loose enough to hide it."""
    fmt, row = packed_row(name, 130, 200)
    x = torch.randn(3, 130, generator=torch.Generator().manual_seed(1))
    weight_only = ExpertFormat(fmt.storage, 130, 200, torch.float32)
    got, expected = run_kernel(fmt, row, x, "silu"), reference(fmt, row, x, "silu")
    error, rounding = (got - expected).abs().max(), (reference(weight_only, row, x, "silu") - expected).abs().max()
    assert rounding > 100 * error


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_row_chunks_do_not_change_the_result(chunks):
    fmt, row = packed_row("int4", 130, 200)
    x = torch.randn(5, 130, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(run_kernel(fmt, row, x, "silu", chunks), run_kernel(fmt, row, x, "silu", 2))


def test_fp8_decode_equals_the_lookup_table_bit_for_bit():
    """The kernels decode fp8 with integer ops; every one of the 256 codes (NaN, zeros, subnormals) gives the
    value of the float8_e4m3fn lookup table."""
    codes = np.arange(256, dtype=np.uint8).reshape(1, 256)
    decoded = np.full(256, 7.0, np.float32)
    _fp8_decode_row(codes, np.ones((1, 2), np.float32), 1, 0, decoded)
    nan = np.isnan(FP8_LUT)                                   # codes 0x7F and 0xFF
    np.testing.assert_array_equal(np.isnan(decoded), nan)
    np.testing.assert_array_equal(decoded[~nan].view(np.uint32), FP8_LUT[~nan].view(np.uint32))


def test_fp8_kernel_runs_every_finite_code():
    """A row whose codes run through all 254 finite float8_e4m3fn values (scale 1) matches the torch backend."""
    fmt = ExpertFormat("fp8", 128, 129, torch.float32)
    row = torch.zeros(fmt.row_numel, dtype=torch.uint8)
    views = fmt.views(row)
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    for matrix in ("gate_up", "down"):
        q = views[matrix].view(-1)
        q.copy_(codes.repeat(q.numel() // codes.numel() + 1)[: q.numel()])
        views[f"{matrix}_scale"].fill_(1e-3)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)) * 1e-2
    for tokens in (1, 3):
        assert_close_scaled(run_kernel(fmt, row.numpy(), x[:tokens], "silu"),
                            reference(fmt, row.numpy(), x[:tokens], "silu"))


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_runner_runs_packed_jobs_on_either_backend(backend):
    hidden, inter, tokens = 66, 34, 6
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(3))
    expected = torch.zeros(tokens, hidden)
    jobs = []
    for e, name in enumerate(["int8", "int4", "int4-g128", "fp8"]):
        fmt, row = packed_row(name, hidden, inter, seed=e)
        rows = torch.arange(e % 2, tokens, 1 + e % 2)
        weights = torch.full((rows.numel(),), 0.5 + e)
        expected.index_add_(0, rows, weights[:, None] * reference(fmt, row, x[rows], "silu"))
        jobs.append(CpuJob(row, rows.numpy(), weights.numpy(), "silu", fmt=fmt))
    with CpuRunner(num_threads=1) as runner:
        runner.set_choices({name: {b: backend for b in BUCKETS} for name in SHAPES})
        assert runner.backend("int4", 3) == backend
        out = runner.run(x.numpy(), jobs)
    assert_close_scaled(torch.from_numpy(out), expected)


def test_runner_keeps_the_measured_choice_per_format_and_bucket():
    with CpuRunner(num_threads=1) as runner:
        runner.warmup(dtypes=("bfloat16",), packed=("int4", "fp8"))
        timings = runner.measure_backends(64, 96, ["bf16", "int4"], budget_s=0.2)
        assert set(timings) == {"bfloat16", "int4"}
        for name, per_bucket in timings.items():
            assert set(per_bucket) == set(BUCKETS)
            assert all(t["numba"] > 0 and t["torch"] > 0 for t in per_bucket.values())
            assert runner.choices[name] == pick(per_bucket)
            for tokens in (1, 2, 40, 1000):
                assert runner.backend(name, tokens) == runner.choices[name][bucket_of(tokens)]
        assert runner.backend("bf16", 64) == runner.choices["bfloat16"][64]
        assert runner.backend("fp8", 1) == "numba"   # not measured: Numba


def test_buckets_and_measured_shape():
    assert [bucket_of(t) for t in (1, 2, 4, 5, 64, 65, 10_000)] == [1, 4, 4, 16, 64, 256, 256]
    assert measured_shape(512, 2048) == (512, 2048)
    hidden, inter = measured_shape(4096, 14336)
    assert hidden == 4096 and inter % 2 == 0 and 3 * hidden * inter <= MAX_PARAMS
    assert pick({1: {"numba": 1.0, "torch": 2.0}, 4: {"numba": 2.0, "torch": 1.0}}) == {1: "numba", 4: "torch"}


@pytest.mark.parametrize("tokens", [1, 16])
def test_no_buffer_allocation_per_call(tokens):
    fmt, row = packed_row("int4", 256, 512)
    x = np.ones((tokens, 256), np.float32)
    out, scratch = np.empty_like(x), np.empty(packed_scratch_size(fmt, tokens), np.float32)
    rows = np.empty((2, row_buffer_width(fmt)), np.float32)
    packed_ffn(x, row, fmt, "silu", out, scratch, rows)
    tracemalloc.start()
    for _ in range(10):
        packed_ffn(x, row, fmt, "silu", out, scratch, rows)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 1024


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "row": a["row"][:-16]}, "bytes"),
        (lambda a: {**a, "row": a["row"].view(np.int8)}, "uint8"),
        (lambda a: {**a, "row": a["row"].view(np.float32)}, "uint8"),
        (lambda a: {**a, "fmt": ExpertFormat("bf16", 66, 34, torch.float32)}, "packed ExpertFormat"),
        (lambda a: {**a, "fmt": ExpertFormat("int4", 66, 36, torch.float32)}, "expects"),
        (lambda a: {**a, "x": a["x"].astype(np.float64)}, "x must be a float32"),
        (lambda a: {**a, "rows": a["rows"][:, :10].copy()}, "rows must have shape"),
        (lambda a: {**a, "rows": a["rows"].astype(np.float64)}, "rows must be"),
        (lambda a: {**a, "act": "relu"}, "activation"),
        (lambda a: {**a, "scratch": a["scratch"][:-1]}, "needs .*packed_scratch_size"),
    ],
)
def test_bad_input_raises_value_error(change, message):
    fmt, row = packed_row("int4", 66, 34)
    args = {"x": np.ones((2, 66), np.float32), "row": row, "fmt": fmt, "act": "silu",
            "out": np.empty((2, 66), np.float32), "scratch": np.empty(packed_scratch_size(fmt, 2), np.float32),
            "rows": np.zeros((2, row_buffer_width(fmt)), np.float32)}
    with pytest.raises(ValueError, match=message):
        packed_ffn(**change(args))


def test_runner_rejects_bad_packed_jobs_in_the_caller():
    fmt, row = packed_row("fp8", 66, 34)
    with CpuRunner(num_threads=1) as runner:
        with pytest.raises(ValueError, match="bytes"):
            runner.submit(np.ones((2, 66), np.float32), [CpuJob(row[:-1], np.array([0]), np.ones(1, np.float32),
                                                                fmt=fmt)])
        with pytest.raises(ValueError, match="'numba' \\| 'torch'"):
            runner.set_choices({"fp8": {3: "numba"}})


# -- the measured CPU seconds in the hardware profile and the cost model ------------------------------------------------
def test_calibration_records_the_chosen_backend_seconds(tmp_path):
    with CpuRunner(num_threads=1) as runner:
        fields = measure_cpu_experts(runner, ExpertShape(64, 96), ["int4", "float32"], budget_s=0.2)
        choices = runner.choices
    assert fields["cpu_expert_params"] == 3 * 64 * 96
    assert fields["cpu_backend"] == {"int4": choices["int4"], "float32": choices["float32"]}
    for name, per_bucket in fields["cpu_expert_s"].items():
        assert per_bucket == {b: runner.timings[name][b][choices[name][b]] for b in BUCKETS}
    profile = dataclasses.replace(HardwareProfile.from_yaml("h100-pcie5"), **fields)
    assert HardwareProfile.from_yaml(profile.to_yaml(tmp_path / "p.yaml")) == profile


def test_cost_model_interpolates_measured_cpu_seconds():
    base = dataclasses.replace(HardwareProfile.from_yaml("h100-pcie5"), cpu_start_us=0.0)
    measured = {"int4": {1: 1e-3, 4: 2e-3, 16: 5e-3}}
    profile = dataclasses.replace(base, cpu_expert_s=measured, cpu_expert_params=3 * 100 * 200)
    same, double = 6 * 100 * 200, 2 * 6 * 100 * 200      # flops per token of the measured expert, of one twice its size
    costs = CostModel(profile, 30_000, same, expert_format="int4")
    assert [costs.cpu_s(t) for t in (0, 1, 2, 4, 10, 16)] == pytest.approx([0.0, 1e-3, 4e-3 / 3, 2e-3, 3.5e-3, 5e-3])
    assert costs.cpu_s(32) == pytest.approx(5e-3 + 16 * 3e-3 / 12)      # the last segment's slope
    assert CostModel(profile, 60_000, double, expert_format="int4").cpu_s(4) == pytest.approx(4e-3)
    started = dataclasses.replace(profile, cpu_start_us=50.0)                # the fixed start-up adds
    assert CostModel(started, 30_000, same, expert_format="int4").cpu_s(4) == pytest.approx(2e-3 + 50e-6)
    roofline = CostModel(base, 30_000, same)
    for fmt in ("", "fp8"):                                             # unmeasured: the roofline, as before
        assert CostModel(profile, 30_000, same, expert_format=fmt).cpu_s(4) == roofline.cpu_s(4)


@pytest.mark.parametrize("name,shape", [("int4", (130, 200)), ("int4-g32", (66, 18)), ("int4-g128", (66, 258)),
                                        ("int4-g128", (256, 384)),
                                        ("int4-a8", (256, 128))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_exact_dequantization_is_the_devices_weights_bit_for_bit(name, shape, dtype):
    """dequantize_int4_exact (the torch backend's int4 weights) equals ExpertFormat.unpack into the compute
    dtype (what a device computes with), columns deinterleaved, bit for bit: also short last groups."""
    from moe_offload.cpu_kernels.packed_kernels import dequantize_int4_exact

    _, row = packed_row(name, *shape)
    device = ExpertFormat(name, *shape, dtype)
    views = device.numpy_views(row)
    for matrix, expected in zip(("gate_up", "down"), device.unpack(torch.from_numpy(row))):
        out = np.empty(expected.shape, np.float32 if dtype == torch.float32 else np.uint16)
        dequantize_int4_exact(views[matrix], views[f"{matrix}_scale"].view(np.int16),
                              views[f"{matrix}_zero"].view(np.int16), device.group, out)
        got = torch.from_numpy(out) if dtype == torch.float32 else torch.from_numpy(out).view(torch.bfloat16)
        assert torch.equal(got, torch.cat([expected[:, 0::2], expected[:, 1::2]], dim=1)), matrix


@pytest.mark.parametrize("name", ["int4", "int4-a8"])
def test_bf16_int4_experts_on_the_torch_backend_compute_what_a_bf16_device_computes(name):
    """With a bfloat16 compute dtype the torch backend runs F.linear in bfloat16 on the device's weights:
    within bfloat16 rounding of the device's expert (unpack, forward in bfloat16), and farther from the
    float32 one (control: the float32 arithmetic is not what runs)."""
    from moe_offload.cpu_kernels.torch_backend import TorchExperts
    from moe_offload.cpu_kernels.activations import SILU

    hidden, inter = 256, 128
    _, row = packed_row(name, hidden, inter)
    fmt = ExpertFormat(name, hidden, inter, torch.bfloat16)
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    out = np.full((5, hidden), np.nan, np.float32)
    TorchExperts().run(x.numpy(), row, inter, SILU, out, fmt=fmt)
    gate_up, down = fmt.unpack(torch.from_numpy(row))
    device = fmt.forward(x.bfloat16(), gate_up, down, F.silu).float()
    got = torch.from_numpy(out)
    assert_close_scaled(got, device, tol=2e-2)
    f32 = ExpertFormat(name, hidden, inter, torch.float32)
    exact = f32.forward(x, *f32.unpack(torch.from_numpy(row)), F.silu)
    assert (got - device).abs().max() < (device - exact).abs().max()



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [130, 256])
def test_numba_fake_quantize_is_the_torch_rounding_bit_for_bit(dtype, width):
    """packed_kernels.fake_quantize_rows (the torch backend's "-a8" rounding) equals act_quant.fake_quantize,
    deinterleaved or not: a zero block, a short last block, values on rounding ties."""
    from moe_offload.cpu_kernels.act_quant import fake_quantize
    from moe_offload.cpu_kernels.packed_kernels import fake_quantize_rows

    x = (torch.randn(5, width, generator=torch.Generator().manual_seed(width)) * 3).to(dtype)
    x[0, :64] = 0                                        # a zero block: scale 0, codes 0
    x[1, :64] = torch.arange(64) - 31.75                 # max 32.25: many x / scale land near .5
    expected = fake_quantize(x)
    source = x.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else x.numpy()
    for deinterleave, want in ((False, expected), (True, torch.cat([expected[:, 0::2], expected[:, 1::2]], 1))):
        out = np.empty_like(source)
        fake_quantize_rows(source, out, deinterleave)
        got = torch.from_numpy(out.view(np.int16)).view(dtype) if dtype == torch.bfloat16 else torch.from_numpy(out)
        assert torch.equal(got, want), deinterleave


def test_fp8_row_dot_decodes_every_code_as_the_table_does():
    """simd.fp8_blocks_dot (the T = 1 fp8 kernel) against FP8_LUT: every finite code (normal, subnormal, both
    zeros, both signs) with its block's scale, a short last step; a NaN code makes the row NaN."""
    from numba import njit

    from moe_offload.cpu_kernels.packed_kernels import FP8_LUT
    from moe_offload.cpu_kernels.simd import fp8_blocks_dot

    @njit
    def rows(q, scale, x, out):
        for r in range(q.shape[0]):
            out[r] = fp8_blocks_dot(q, r, scale[r], x)

    finite = np.array([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=np.uint8)      # 254 codes
    q = np.stack([finite, finite[::-1], finite]).copy()
    q[2, 5] = 0x7F
    scale = np.array([[0.5, 2.0], [1.0, 0.25], [1.0, 1.0]], dtype=np.float32)               # [rows, 2 blocks]
    x = np.random.default_rng(1).standard_normal(254).astype(np.float32)
    out = np.empty(3, np.float32)
    rows(q, scale, x, out)
    for r in range(2):
        weights = FP8_LUT[q[r]].astype(np.float64) * np.repeat(scale[r], 128)[:254]
        expected = weights @ x.astype(np.float64)
        assert abs(out[r] - expected) <= 1e-5 * np.abs(weights * x).sum(), r
    assert np.isnan(out[2])


def test_backends_are_timed_in_alternation_and_a_clearly_slower_one_gives_up():
    calls = []

    def timed(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run

    seconds = alternated_medians({"a": timed("a", 0.002), "b": timed("b", 0.002), "slow": timed("slow", 0.05)},
                                 budget_s=0.0, min_runs=3, give_up=4.0)
    assert calls == ["a", "b", "slow"] + ["a", "b"] * 3       # warm-ups, then rounds in turn; "slow" given up
    assert seconds["slow"] >= 0.05 and 0.002 <= seconds["a"] < 0.05 and 0.002 <= seconds["b"] < 0.05
