"""Numba CPU expert kernels vs torch on CPU, and weight streaming vs the machine's read bandwidth.

    python bench/cpu_kernels.py [--out bench/results] [--smoke] [--hidden 1024 --inter 3584]
                                [--threads N] [--tokens 1 4 16 64]
                                [--dtypes fp32 fp16 bf16 int8 int4 int4-g128 fp8 int8-a8 int4-a8 int4-g128-a8]

For every expert format and token count it times one expert FFN (T = tokens, H = hidden,
I = intermediate) on the CPU runner's two backends, with the same thread count: the Numba
kernels (`expert_ffn` for native blocks, `packed_ffn` for packed rows) and torch (F.linear on
the block's own dtype; packed rows dequantized into one float32 scratch first). Each timing
cycles through enough distinct expert copies (>= --working-set MiB) that the weights come from
DRAM, not the last-level cache; the two backends' passes alternate, so a drift in bandwidth weighs
on both alike. memory_gbps is a parallel numba reduction over a 1 GiB float32 array measured in the
same run. `picked` is the backend CpuRunner.measure_backends chooses for
that format and T on this machine (its own short measurement), and `picked/best` how its time
here compares with the faster of the two. The JSON records the CPU model and SIMD flags.
Prints one table and the checks at T = 1 (every packed format's weight GB/s as % of the read
bandwidth, int4 vs bf16), writes cpu_kernels.json and .png under --out. --smoke: tiny shapes, every
format and path once, seconds; nothing is written unless --out is given.

OpenMP threads (numba's and torch's share one libgomp) spin at barriers by default (300,000
iterations); on shared cores a spinning team keeps the other one off its cores. PASSIVE (no spin)
avoids that but makes every parallel region wake its threads from sleep: an int4-a8 expert at T = 1 is
two regions, and their wake-ups cost about a third of its 0.34 ms on a 2-core AVX-512 EPYC. This
script therefore defaults to a bounded spin, OMP_WAIT_POLICY=ACTIVE with GOMP_SPINCOUNT=20000 (tens of
microseconds, then sleep), unless OMP_WAIT_POLICY is set in the environment. The values used are recorded in
the JSON.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

if "OMP_WAIT_POLICY" not in os.environ:   # before numba / torch load libgomp: a bounded spin
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_offload.cpu_kernels import CpuRunner, expert_ffn  # noqa: E402
from moe_offload.cpu_kernels.backends import sample_expert  # noqa: E402
from moe_offload.cpu_kernels.packed import PACKED, canonical_expert_format  # noqa: E402
from moe_offload.cpu_kernels.packed_ffn import packed_ffn, packed_scratch_size  # noqa: E402
from moe_offload.cpu_kernels.torch_backend import TorchExperts  # noqa: E402

from common import BenchRun, median, parallel_sum, parse_bench_args, print_table  # noqa: E402

FORMATS = ["fp32", "fp16", "bf16", "int8", "int4", "int4-g128", "fp8", "int8-a8", "int4-a8", "int4-g128-a8"]
BANDWIDTH_BYTES = 1 << 30
COMPUTE = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Environment that changes thread behaviour; recorded with the results.
ENV_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "OMP_NUM_THREADS")
TABLE = [
    ("dtype", "dtype", ""), ("tokens", "T", "d"), ("shape_str", "H x I", ""),
    ("numba_ms", "numba ms", ".3f"), ("torch_ms", "torch ms", ".3f"), ("speedup", "torch/numba", ".2f"),
    ("weight_gbps", "weight GB/s", ".1f"), ("memory_gbps", "memory GB/s", ".1f"), ("mem_pct", "% of mem", ".0f"),
    ("picked", "picked", ""), ("picked_vs_best", "picked/best", ".2f"),
]


def memory_gbps(repeats: int, bandwidth_bytes: int = BANDWIDTH_BYTES) -> float:
    """Read bandwidth (GB/s): median time of a parallel reduction over a 1 GiB float32 array."""
    values = np.ones(bandwidth_bytes // 4, dtype=np.float32)
    parallel_sum(values[:1024])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        parallel_sum(values)
        times.append(time.perf_counter() - start)
    return values.nbytes / median(times) / 1e9


def make_blocks(dtype: str, hidden: int, inter: int, count: int, compute_dtype: torch.dtype) -> list:
    """`count` distinct copies of one random expert in format `dtype` (backends.sample_expert), packed
    formats computed in ``compute_dtype`` (what torch dequantizes int4 into)."""
    expert = sample_expert(dtype, hidden, inter, compute_dtype=compute_dtype)
    return [(expert.block.copy(), expert.fmt) for _ in range(count)]


def numba_expert(x, block, fmt, inter, out, scratch, rows) -> None:
    """The runner's Numba backend: packed_ffn for packed rows, expert_ffn for native blocks."""
    if fmt is not None:
        packed_ffn(x, block, fmt, "silu", out, scratch, rows)
    else:
        expert_ffn(x, block, x.shape[1], inter, "silu", out, scratch)


def time_per_call(runs: dict, blocks: list[tuple], repeats: int, budget_s: float) -> dict[str, tuple[float, int]]:
    """{name: (median over passes of pass time / blocks per pass in ms, blocks per pass)} of each of ``runs``,
    their passes alternated (so a drift in the machine's bandwidth weighs on each alike).

    Slow (compute-bound) cases cycle fewer blocks and take fewer passes (>= 3), so that one
    case takes about budget_s; fast (memory-bound) cases cycle all blocks.
    """
    plans = {}
    for name, run in runs.items():
        run(*blocks[0])
        start = time.perf_counter()
        run(*blocks[-1])
        call = max(time.perf_counter() - start, 1e-9)
        used = blocks[: max(1, min(len(blocks), int(budget_s / (3 * call))))]
        plans[name] = (used, max(3, min(repeats, int(budget_s / (call * len(used))))))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for turn in range(max(passes for _, passes in plans.values())):
        for name, run in runs.items():
            used, passes = plans[name]
            if turn < passes:
                start = time.perf_counter()
                for block, fmt in used:
                    run(block, fmt)
                times[name].append((time.perf_counter() - start) / len(used))
    return {name: (median(times[name]) * 1e3, len(plans[name][0])) for name in runs}


def bench_case(dtype: str, tokens: int, blocks: list, args, mem_gbps: float, picked: str) -> dict:
    """One (format, T) row: Numba and torch times, streamed weight bandwidth, the runner's pick."""
    hidden, inter = args.hidden, args.inter
    x = np.random.default_rng(tokens).standard_normal((tokens, hidden)).astype(np.float32)  # [T, H]
    out = np.empty((tokens, hidden), dtype=np.float32)  # [T, H]
    fmt = blocks[0][1]   # None for native blocks (expert_ffn's scratch: [T, I] and more)
    need = tokens * (2 * inter + hidden) if fmt is None else packed_scratch_size(fmt, tokens)
    scratch = np.empty(need, dtype=np.float32)
    rows = np.empty((numba.get_num_threads(), 2 * max(hidden, inter)), dtype=np.float32)  # packed_ffn row_buffer_width
    torch_backend = TorchExperts()
    timed = time_per_call({"numba": lambda b, f: numba_expert(x, b, f, inter, out, scratch, rows),
                           "torch": lambda b, f: torch_backend.run(x, b, inter, 0, out, None, f)},
                          blocks, args.repeats, args.budget)
    (numba_ms, cycled), (torch_ms, _) = timed["numba"], timed["torch"]
    weight_gbps = blocks[0][0].nbytes / (numba_ms * 1e-3) / 1e9
    return {
        "dtype": dtype, "tokens": tokens, "shape": [hidden, inter], "numba_ms": round(numba_ms, 4),
        "torch_ms": round(torch_ms, 4), "weight_gbps": round(weight_gbps, 2), "memory_gbps": round(mem_gbps, 2),
        "experts_cycled": cycled, "bytes_per_expert": blocks[0][0].nbytes, "picked": picked,
    }


def expert_count(block_bytes: int, args) -> int:
    """Distinct experts per timing pass so that their weights total >= --working-set MiB."""
    return max(2, math.ceil(args.working_set * 2**20 / block_bytes))


def runner_picks(formats: list[str], args, threads: int) -> dict[str, dict[int, str]]:
    """{format: {bucket: backend}} as CpuRunner chooses on this machine for the benchmarked expert shape."""
    with CpuRunner(num_threads=threads) as runner:
        runner.warmup(dtypes=(), packed=formats)
        runner.measure_backends(args.hidden, args.inter, formats, budget_s=args.pick_budget,
                                compute_dtype=COMPUTE[args.compute_dtype])
        return {name: {t: runner.backend(name, t) for t in args.tokens} for name in formats}


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
    """Run every (format, T) case, print the table, write JSON and PNG."""
    run = BenchRun.start(args)
    bandwidth_bytes = BANDWIDTH_BYTES >> 6 if args.smoke else BANDWIDTH_BYTES
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    mem = memory_gbps(args.repeats, bandwidth_bytes)
    picks = runner_picks([canonical_expert_format(d) for d in args.dtypes], args, threads)
    results = []
    for dtype in args.dtypes:
        compute = COMPUTE[args.compute_dtype]
        one = make_blocks(dtype, args.hidden, args.inter, 1, compute)
        blocks = one + make_blocks(dtype, args.hidden, args.inter, expert_count(one[0][0].nbytes, args) - 1, compute)
        for tokens in args.tokens:
            picked = picks[canonical_expert_format(dtype)][tokens]
            results.append(bench_case(dtype, tokens, blocks, args, mem, picked))
        del blocks, one
    mem_end = memory_gbps(args.repeats, bandwidth_bytes)
    for r in results:
        best = min(r["numba_ms"], r["torch_ms"])
        r["picked_vs_best"] = round(r[f"{r['picked']}_ms"] / best, 3)
        r["tokens_per_s"] = round(r["tokens"] / (best * 1e-3), 1)
        r["shape_str"] = f"{r['shape'][0]} x {r['shape'][1]}"
        r["speedup"] = r["torch_ms"] / r["numba_ms"]
        r["mem_pct"] = 100 * r["weight_gbps"] / r["memory_gbps"]
    print_table(results, TABLE)
    info = {**run.machine(), "threading_layer": numba.threading_layer(), "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(), "memory_gbps_end": round(mem_end, 2),
            "env": {name: os.environ.get(name) for name in ENV_VARS}}
    print(f"memory read bandwidth: {mem:.1f} GB/s at start, {mem_end:.1f} GB/s at end; "
          f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"CPU: {info.get('cpu_model', '?')}, flags {' '.join(info.get('cpu_flags', []))}, {threads} threads")
    checks = decode_checks(results)
    for line in checks["lines"]:
        print(line)
    for r in results:
        for key in ("shape_str", "speedup", "mem_pct"):
            r.pop(key)
    out = run.write_json("cpu_kernels.json", {"threads": threads, "compute_dtype": args.compute_dtype, "runner_picks": picks, "checks": checks,
                                              "results": results}, machine=info)
    plot(results, run.path("cpu_kernels.png"), threads)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def decode_checks(results: list[dict]) -> dict:
    """At T = 1: each packed format's weight GB/s as % of the read bandwidth (best backend), int4 (and
    int4-a8) speedup over bf16, and the worst picked/best over every row."""
    one = {r["dtype"]: r for r in results if r["tokens"] == 1}
    best_ms = {name: min(r["numba_ms"], r["torch_ms"]) for name, r in one.items()}
    pct = {name: round(100 * r["bytes_per_expert"] / (best_ms[name] * 1e-3) / 1e9 / r["memory_gbps"], 1)
           for name, r in one.items() if canonical_expert_format(name) in PACKED}
    speedup = {name: round(best_ms["bf16"] / best_ms[name], 2) for name in ("int4", "int4-a8", "int8-a8", "int8")
               if name in best_ms and "bf16" in best_ms}
    worst = max((r["picked_vs_best"] for r in results), default=1.0)
    lines = ["T=1 % of read bandwidth: " + ", ".join(f"{k} {v:.0f}%" for k, v in pct.items()),
             "T=1 speedup over bf16: " + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items()),
             f"worst picked/best: {worst:.2f}"]
    return {"pct_of_bandwidth_t1": pct, "speedup_over_bf16_t1": speedup, "worst_picked_vs_best": worst,
            "lines": lines}


SMOKE = {"hidden": 64, "inter": 128, "tokens": [1, 16], "repeats": 2, "budget": 0.05, "working_set": 1,
         "pick_budget": 0.05}


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=3584)
    p.add_argument("--threads", type=int, default=0, help="numba and torch threads (0: all)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--dtypes", nargs="+", default=FORMATS, choices=FORMATS)
    p.add_argument("--repeats", type=int, default=15, help="max timing passes per case")
    p.add_argument("--budget", type=float, default=1.2, help="seconds per timing (fewer passes when slow)")
    p.add_argument("--working-set", type=int, default=256, help="MiB of distinct expert weights per pass")
    p.add_argument("--compute-dtype", choices=list(COMPUTE), default="bfloat16",
                   help="the model dtype packed experts compute in (the torch backend dequantizes int4 into it; "
                        "default bfloat16, the released checkpoints')")
    p.add_argument("--pick-budget", type=float, default=2.0, help="seconds CpuRunner.measure_backends spends")
    return parse_bench_args(p, argv, SMOKE)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
