"""Measure a HardwareProfile on this machine: copy GB/s, device and CPU expert times."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from ..cpu_kernels.packed import ExpertFormat
from ..transfer import ExpertShape
from .cost import HardwareProfile

# T = tokens, H = hidden size, I = expert intermediate size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up, synchronising a CUDA device."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _device_expert(block: torch.Tensor, fmt: ExpertFormat, x: torch.Tensor, scratch) -> torch.Tensor:
    gate_up, down = fmt.unpack(block, scratch)                            # views, or dequantized into scratch
    return fmt.forward(x, gate_up, down, F.silu)                          # [T, H]


def measure_profile(host_block: torch.Tensor, slot: torch.Tensor, shape: ExpertShape, cpu_runner=None,
                    name: str = "measured", repeats: int = 5, tokens: int = 128,
                    fmt: ExpertFormat | None = None, cpu_formats: Sequence[str] | None = None) -> HardwareProfile:
    """Roofline rates from timing one expert: copy into ``slot``, device compute at 1 and ``tokens``
    tokens, and the CPU kernel at 1 and ``tokens`` tokens (when a runner is given). ``fmt``: the
    stored format of ``host_block`` (default: native, of the slot's dtype); a packed expert's device time
    includes dequantizing it. With a runner, also the CPU backend choice and seconds per token bucket of
    ``cpu_formats`` (default: ``fmt``'s), see measure_cpu_experts."""
    device = slot.device
    fmt = fmt or ExpertFormat(str(slot.dtype).removeprefix("torch."), shape.hidden, shape.intermediate, slot.dtype)
    scratch = torch.empty(shape.numel, dtype=fmt.compute_dtype, device=device) if fmt.needs_scratch else None
    nbytes = fmt.nbytes
    flops = 6 * shape.hidden * shape.intermediate
    full = median_seconds(lambda: slot.copy_(host_block, non_blocking=True), device, repeats)
    small = host_block[: max(1, host_block.numel() // 16)]
    part = median_seconds(lambda: slot[: small.numel()].copy_(small, non_blocking=True), device, repeats)
    latency = max(0.0, (16 * part - full) / 15)           # t = latency + bytes / bw, from two sizes
    h2d = nbytes / max(full - latency, 1e-9)
    x1 = torch.randn(1, shape.hidden, dtype=fmt.compute_dtype, device=device)
    xt = torch.randn(tokens, shape.hidden, dtype=fmt.compute_dtype, device=device)
    g1 = median_seconds(lambda: _device_expert(slot, fmt, x1, scratch), device, repeats)
    gt = median_seconds(lambda: _device_expert(slot, fmt, xt, scratch), device, repeats)
    c1, ct = g1, gt
    if cpu_runner is not None:
        from ..cpu_kernels import CpuJob, as_numpy_block

        block_np = host_block.numpy() if fmt.packed else as_numpy_block(host_block)

        def run_cpu(t: int):
            x = torch.randn(t, shape.hidden).numpy()
            job = CpuJob(block_np, torch.arange(t).numpy(), torch.ones(t).numpy(), fmt=fmt if fmt.packed else None)
            return lambda: cpu_runner.run(x, [job])

        c1 = median_seconds(run_cpu(1), torch.device("cpu"), repeats)
        ct = median_seconds(run_cpu(tokens), torch.device("cpu"), repeats)
    profile = HardwareProfile(
        name=name, h2d_gbps=h2d / 1e9, copy_latency_us=latency * 1e6,
        gpu_mem_gbps=nbytes / g1 / 1e9, gpu_tflops=tokens * flops / gt / 1e12, gpu_launch_us=0.0,
        cpu_mem_gbps=nbytes / c1 / 1e9, cpu_gflops=tokens * flops / ct / 1e9, cpu_start_us=0.0,
        source=f"measured by moe-offload calibrate on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
        f" with one {shape.hidden}x{shape.intermediate} {fmt.name} expert",
    )
    if cpu_runner is None:
        return profile
    formats = [fmt.name] if cpu_formats is None else cpu_formats
    if not formats:     # (a format without Numba kernels: the roofline above is its CPU cost)
        return profile
    return dataclasses.replace(profile, **measure_cpu_experts(cpu_runner, shape, formats,
                                                              compute_dtype=fmt.compute_dtype))


def measure_cpu_experts(cpu_runner, shape: ExpertShape, formats: Sequence[str], budget_s: float = 2.0,
                        compute_dtype: torch.dtype = torch.float32) -> dict:
    """The CPU runner's backend choice per format and token bucket (CpuRunner.measure_backends, on an
    expert of the model's shape, capped, computed in the model's dtype) and the chosen backend's seconds:
    HardwareProfile's cpu_expert_s, cpu_expert_params and cpu_backend fields. The runner keeps using the
    choices."""
    timings = cpu_runner.measure_backends(shape.hidden, shape.intermediate, formats, budget_s=budget_s,
                                          compute_dtype=compute_dtype)
    hidden, inter = cpu_runner.measured_shape
    choices = cpu_runner.choices
    seconds = {name: {bucket: float(per[choices[name][bucket]]) for bucket, per in buckets.items()}
               for name, buckets in timings.items()}
    return {"cpu_expert_s": seconds, "cpu_expert_params": 3 * hidden * inter,
            "cpu_backend": {name: choices[name] for name in timings}}
