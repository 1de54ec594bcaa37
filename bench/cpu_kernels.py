"""Numba CPU expert kernels vs torch on CPU, and weight streaming vs the machine's read bandwidth.

    python bench/cpu_kernels.py [--json bench/results/cpu_kernels.json] [--hidden 1024 --inter 3584]
                                [--threads N] [--tokens 1 4 16 64] [--dtypes fp32 fp16 bf16 int8]

For every weight format and token count it times one expert FFN (T = tokens, H = hidden,
I = intermediate) with `expert_ffn` and with the same computation in torch (F.linear chain on
weights of the same dtype; int8 uses torch's per-channel int8 weight-only matmul), both with
the same thread count. Each timing cycles through enough distinct expert blocks (>= --working-set
MiB) that the weights come from DRAM, not the last-level cache. memory_gbps is a parallel numba
reduction over a 1 GiB float32 array measured in the same run. Prints one table, writes JSON and
a PNG plot next to it.

OpenMP threads (numba's and torch's share one libgomp) spin at barriers by default; on shared
cores a preempted thread then stalls a kernel for a scheduler time slice. This script therefore
defaults OMP_WAIT_POLICY to PASSIVE for both (set it in the environment to override); the value
used is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before numba / torch load libgomp

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_offload.cpu_kernels import as_numpy_block, as_torch_block, expert_ffn  # noqa: E402

from common import RESULTS, machine, median, print_table, write_json  # noqa: E402

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BANDWIDTH_BYTES = 1 << 30
# Environment that changes thread behaviour; recorded with the results.
ENV_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "OMP_NUM_THREADS")
TABLE = [
    ("dtype", "dtype", ""), ("tokens", "T", "d"), ("shape_str", "H x I", ""),
    ("numba_ms", "numba ms", ".3f"), ("torch_ms", "torch ms", ".3f"), ("speedup", "torch/numba", ".2f"),
    ("weight_gbps", "weight GB/s", ".1f"), ("memory_gbps", "memory GB/s", ".1f"), ("mem_pct", "% of mem", ".0f"),
]


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _parallel_sum(values):
    """Sum of a float32 array (a streaming read at full parallel bandwidth)."""
    total = np.float32(0.0)
    for i in numba.prange(values.size):
        total += values[i]
    return total


def memory_gbps(repeats: int) -> float:
    """Read bandwidth (GB/s): median time of a parallel reduction over a 1 GiB float32 array."""
    values = np.ones(BANDWIDTH_BYTES // 4, dtype=np.float32)
    _parallel_sum(values[:1024])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _parallel_sum(values)
        times.append(time.perf_counter() - start)
    return values.nbytes / median(times) / 1e9


def make_blocks(dtype: str, hidden: int, inter: int, count: int, seed: int = 0) -> list[tuple]:
    """`count` expert blocks as (numpy block, scales or None); int8 gets random codes and scales."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(count):
        if dtype == "int8":
            q = torch.randint(-127, 128, (3 * hidden * inter,), generator=gen, dtype=torch.int8).numpy()
            scales = (torch.rand(2 * inter + hidden, generator=gen) * 1e-3 + 1e-4).numpy()
            blocks.append((q, scales))
        else:
            weights = (torch.randn(3 * hidden * inter, generator=gen) * 0.02).to(TORCH_DTYPES[dtype])
            blocks.append((as_numpy_block(weights), None))
    return blocks


def torch_expert(x: np.ndarray, block: np.ndarray, scales, hidden: int, inter: int) -> torch.Tensor:
    """The same expert FFN in torch on the block's own dtype (int8: weight-only int8 matmul)."""
    split = 2 * inter * hidden
    weights = as_torch_block(block)
    gate_up, down = weights[:split].view(2 * inter, hidden), weights[split:].view(hidden, inter)
    if scales is None:
        g, u = F.linear(torch.from_numpy(x).to(weights.dtype), gate_up).chunk(2, -1)
        return F.linear(F.silu(g) * u, down)
    s = torch.from_numpy(scales)
    g, u = torch._weight_int8pack_mm(torch.from_numpy(x), gate_up, s[: 2 * inter]).chunk(2, -1)
    return torch._weight_int8pack_mm(F.silu(g) * u, down, s[2 * inter :])


def time_per_call(run, blocks: list[tuple], repeats: int, budget_s: float) -> tuple[float, int]:
    """(median over passes of pass time / blocks per pass in ms, blocks per pass).

    Slow (compute-bound) cases cycle fewer blocks and take fewer passes (>= 3), so that one
    case takes about budget_s; fast (memory-bound) cases cycle all blocks.
    """
    run(*blocks[0])
    start = time.perf_counter()
    run(*blocks[-1])
    call = max(time.perf_counter() - start, 1e-9)
    used = blocks[: max(1, min(len(blocks), int(budget_s / (3 * call))))]
    passes = max(3, min(repeats, int(budget_s / (call * len(used)))))
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for block, scales in used:
            run(block, scales)
        times.append((time.perf_counter() - start) / len(used))
    return median(times) * 1e3, len(used)


def bench_case(dtype: str, tokens: int, blocks: list[tuple], args, mem_gbps: float) -> dict:
    """One (dtype, T) row: numba and torch times, streamed weight bandwidth."""
    hidden, inter = args.hidden, args.inter
    x = np.random.default_rng(tokens).standard_normal((tokens, hidden)).astype(np.float32)  # [T, H]
    out = np.empty((tokens, hidden), dtype=np.float32)  # [T, H]
    scratch = np.empty(tokens * inter, dtype=np.float32)  # [T, I]
    numba_ms, cycled = time_per_call(
        lambda b, s: expert_ffn(x, b, hidden, inter, "silu", out, scratch, s), blocks, args.repeats, args.budget)
    torch_ms, _ = time_per_call(
        lambda b, s: torch_expert(x, b, s, hidden, inter), blocks, args.repeats, args.budget)
    block, scales = blocks[0]
    weight_bytes = block.nbytes + (0 if scales is None else scales.nbytes)
    weight_gbps = weight_bytes / (numba_ms * 1e-3) / 1e9
    return {
        "dtype": dtype, "tokens": tokens, "shape": [hidden, inter], "numba_ms": round(numba_ms, 4),
        "torch_ms": round(torch_ms, 4), "weight_gbps": round(weight_gbps, 2), "memory_gbps": round(mem_gbps, 2),
        "experts_cycled": cycled,
    }


def expert_count(dtype: str, args) -> int:
    """Distinct experts per timing pass so that their weights total >= --working-set MiB."""
    element = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}[dtype]
    block_bytes = 3 * args.hidden * args.inter * element
    return max(2, math.ceil(args.working_set * 2**20 / block_bytes))


def plot(results: list[dict], path: Path, threads: int) -> None:
    """PNG: ms per T for numba and torch (left), weight GB/s vs memory GB/s (right), per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, dtype in enumerate(dict.fromkeys(r["dtype"] for r in results)):
        rows = [r for r in results if r["dtype"] == dtype]
        tokens = [r["tokens"] for r in rows]
        color = f"C{i}"
        left.plot(tokens, [r["numba_ms"] for r in rows], "o-", color=color, label=f"{dtype} numba")
        left.plot(tokens, [r["torch_ms"] for r in rows], "x--", color=color, label=f"{dtype} torch")
        right.plot(tokens, [r["weight_gbps"] for r in rows], "o-", color=color, label=f"{dtype} numba")
    right.axhline(results[0]["memory_gbps"], color="k", ls=":", label="memory read bandwidth")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    shape = results[0]["shape"]
    left.set_yscale("log")
    left.set_ylabel("ms per expert call")
    left.set_title(f"expert FFN H={shape[0]} I={shape[1]}, {threads} threads")
    right.set_ylabel("weight GB/s (numba)")
    right.set_title("weights streamed per second")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """Run every (dtype, T) case, print the table, write JSON and PNG."""
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    mem = memory_gbps(args.repeats)
    results = []
    for dtype in args.dtypes:
        blocks = make_blocks(dtype, args.hidden, args.inter, expert_count(dtype, args))
        for tokens in args.tokens:
            results.append(bench_case(dtype, tokens, blocks, args, mem))
        del blocks
    mem_end = memory_gbps(args.repeats)
    for r in results:
        r["shape_str"] = f"{r['shape'][0]} x {r['shape'][1]}"
        r["speedup"] = r["torch_ms"] / r["numba_ms"]
        r["mem_pct"] = 100 * r["weight_gbps"] / r["memory_gbps"]
    print_table(results, TABLE)
    print(f"memory read bandwidth: {mem:.1f} GB/s at start, {mem_end:.1f} GB/s at end; "
          f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    for r in results:
        for key in ("shape_str", "speedup", "mem_pct"):
            r.pop(key)
    info = {**machine(), "cpu_count": os.cpu_count(), "numba": numba.__version__,
            "threading_layer": numba.threading_layer(), "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(), "memory_gbps_end": round(mem_end, 2),
            "env": {name: os.environ.get(name) for name in ENV_VARS}}
    out = Path(args.json)
    write_json(out, {"machine": info, "threads": threads, "command": " ".join(sys.argv), "results": results})
    plot(results, out.with_suffix(".png"), threads)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=str(RESULTS / "cpu_kernels.json"), help="output JSON (PNG goes next to it)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=3584)
    p.add_argument("--threads", type=int, default=0, help="numba and torch threads (0: all)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16", "int8"],
                   choices=["fp32", "fp16", "bf16", "int8"])
    p.add_argument("--repeats", type=int, default=15, help="max timing passes per case")
    p.add_argument("--budget", type=float, default=1.2, help="seconds per timing (fewer passes when slow)")
    p.add_argument("--working-set", type=int, default=256, help="MiB of distinct expert weights per pass")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
