"""The disk tier: cold read speed, loading speed, and decode with experts on disk vs all in host memory.

    python bench/full_size.py --preset mixtral-8x7b --layers 2 --out /tmp/mixtral-l2   # 5.9 GB, once
    python bench/disk_tier.py --model /tmp/mixtral-l2 --host-memory 2GiB              # ~10 minutes, 2 cores

Every measurement starts from a cold page cache for the checkpoint's files (posix_fadvise DONTNEED on
each shard; the page cache is never what the numbers measure):

1. sequential read of the shards (what `cat` does, 8 MiB reads): the disk's bandwidth here;
2. loading (from_pretrained, every expert to host memory): the positional reads in flight straight into
   the host store vs the previous path (tensor by tensor through safetensors' reader), as a share of (1);
3. expert reads with the disk reader, 1..8 in flight, as a share of (1);
4. CPU decode ms per token (bf16 on the CPU device) with every expert in host memory vs a host budget
   below the experts (the disk tier), without and with prefetch (the cross-layer gate predicts the
   next layer's experts and those on disk are read ahead): host hit rate, bytes read from disk per token, and the
   resident set beyond dense weights + expert slots + host budget (the runtime's own overhead);
5. the resident set before and after a 256-token generation at a host budget of a quarter of the
   experts, with prefetch (flat: nothing grows per token).

Writes bench/results/disk_tier.json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moe_offload  # noqa: E402
from moe_offload.loading import loader  # noqa: E402
from moe_offload.loading.checkpoint import Checkpoint  # noqa: E402
from moe_offload.loading.config import parse_bytes  # noqa: E402
from moe_offload.transfer.disk import DiskReader  # noqa: E402

from common import BenchRun, parse_bench_args, print_table  # noqa: E402

CHUNK = 8 * 2**20


def shards(path: Path) -> list[Path]:
    return sorted({info.shard for info in Checkpoint(path).tensors.values()})


def drop_cache(files: list[Path]) -> None:
    """Evict the files' pages from the page cache (the next read comes from the disk): written pages are
    flushed first, since only clean pages can be dropped."""
    os.sync()
    try:                                  # the whole page cache, where allowed (root)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        pass
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(files: list[Path]) -> dict:
    drop_cache(files)
    buf = bytearray(CHUNK)
    total, start = 0, time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "gbps": total / seconds / 1e9}


def load_time(path: Path, files: list[Path], direct: bool) -> float:
    """Seconds of a cold from_pretrained with every expert in host memory; ``direct=False``: the previous path."""
    drop_cache(files)
    real = loader.read_stored_rows
    if not direct:
        loader.read_stored_rows = lambda *args: False
    try:
        start = time.perf_counter()
        model = moe_offload.from_pretrained(path, device="cpu", dtype="bfloat16", expert_slots=4, progress=False)
        seconds = time.perf_counter() - start
    finally:
        loader.read_stored_rows = real
    model.offload.close()
    return seconds


def reader_rates(path: Path, files: list[Path], threads: list[int]) -> list[dict]:
    """Cold reads of every expert through the disk reader, ``n`` in flight."""
    from moe_offload.loading.config import OffloadConfig
    from moe_offload.loading.disk_source import checkpoint_runs
    from moe_offload.loading.parts import ModelParts

    parts = ModelParts(path, OffloadConfig(device="cpu", dtype=torch.bfloat16, expert_slots=1))
    runs = checkpoint_runs(parts, parts.format)
    nbytes = parts.format.nbytes
    rows = []
    for n in threads:
        drop_cache(files)
        reader = DiskReader(n)
        out = [np.empty(nbytes, np.uint8) for _ in range(2 * n)]     # n rows in flight, reused
        start = time.perf_counter()
        pending = []
        for i, key in enumerate(sorted(runs)):
            if len(pending) >= n:
                pending.pop(0).wait()
            pending.append(reader.submit(runs[key], out[i % len(out)]))
        for read in pending:
            read.wait()
        seconds = time.perf_counter() - start
        reader.close()
        rows.append({"in_flight": n, "bytes": nbytes * len(runs), "seconds": seconds,
                     "gbps": nbytes * len(runs) / seconds / 1e9})
    return rows


def decode(path: Path, files: list[Path], host_memory: str | None, predictor: str, tokens: int, slots: int) -> dict:
    drop_cache(files)
    model = moe_offload.from_pretrained(path, device="cpu", dtype="bfloat16", expert_slots=slots, progress=False,
                                        host_memory=host_memory, predictor=predictor, prefetch_depth=1)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    model.generate(prompt, max_new_tokens=2, do_sample=False, min_new_tokens=2, pad_token_id=0)  # warm up
    model.offload.stats.reset()
    if model.offload.engine.protocol.residency.host is not None:
        model.offload.engine.protocol.residency.host.reset_counters()
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens, pad_token_id=0)
    seconds = time.perf_counter() - start
    stats, plan = model.offload.stats, model.offload.plan
    rss = rss_bytes()
    budgeted = plan.dense_bytes + plan.slot_bytes + plan.host_bytes    # on the CPU device the slots are host memory
    needed = int(stats.host_hits.sum() + stats.disk_reads.sum() - stats.disk_prefetches.sum())
    tier = model.offload.engine.protocol.residency.host
    demand = int(stats.disk_reads.sum() - stats.disk_prefetches.sum())
    row = {"host_memory": host_memory or "all experts", "predictor": predictor, "ms_per_token": 1e3 * seconds / tokens,
           "host_hit_rate": float(stats.host_hits.sum()) / needed if host_memory and needed else 1.0,
           "disk_bytes_per_token": float(stats.disk_reads.sum()) * stats.bytes_per_expert / tokens,
           "demand_bytes_per_token": demand * stats.bytes_per_expert / tokens,
           "prefetch_used": tier.prefetch_used if tier else 0, "predictor_recall": stats.predictor_recall,
           "read_wait_s_per_token": (tier.wait_s / tokens) if tier else 0.0,
           "read_hidden_s_per_token": (tier.hidden_s / tokens) if tier else 0.0,
           "disk_prefetches": int(stats.disk_prefetches.sum()), "device_hit_rate": stats.hit_rate,
           "rss_bytes": rss, "budgeted_bytes": budgeted, "rss_overhead_bytes": rss - budgeted}
    model.offload.close()
    return row


def rss_bytes() -> int:
    """The process's resident set now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    seq = result["sequential"]["gbps"]
    reads = result["reader"]
    ax1.plot([r["in_flight"] for r in reads], [r["gbps"] for r in reads], marker="o", label="expert reads")
    ax1.axhline(seq, color="gray", linestyle=":", label="sequential read (cat)")
    ax1.set(xlabel="reads in flight", ylabel="GB/s (cold)", title="disk reads")
    ax1.legend(fontsize=8)
    rows = result["decode"]
    ax2.bar([f"{r['host_memory']}\n{r['predictor']}" for r in rows], [r["ms_per_token"] for r in rows])
    ax2.set(ylabel="CPU decode ms / token", title="experts on disk vs in host memory")
    ax2.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_reads(path: Path, files: list[Path], rounds: int, in_flight: list[int]) -> dict:
    """``rounds`` alternating rounds of: sequential read, both load paths (in turn first), the reader at each
    depth (the disk here is shared and its speed drifts, so each number is the median of its rounds, taken
    side by side)."""
    seq, loads, reads = [], {"direct": [], "tensor_by_tensor": []}, {n: [] for n in in_flight}
    for i in range(rounds):
        seq.append(sequential_read(files))
        for name in (list(loads) if i % 2 == 0 else list(loads)[::-1]):   # each path goes first every other round
            loads[name].append(load_time(path, files, name == "direct"))
        for row in reader_rates(path, files, in_flight):
            reads[row["in_flight"]].append(row["gbps"])
    gbps = float(np.median([r["gbps"] for r in seq]))
    seconds = float(np.median([r["seconds"] for r in seq]))
    loading = [{"path": name, "seconds": float(np.median(t)), "all_seconds": t,
                "share_of_sequential": seconds / float(np.median(t))} for name, t in loads.items()]
    reader = [{"in_flight": n, "gbps": float(np.median(g)), "all_gbps": g, "share_of_sequential": float(np.median(g)) / gbps}
              for n, g in reads.items()]
    return {"sequential": {"gbps": gbps, "seconds": seconds, "bytes": seq[0]["bytes"], "rounds": seq},
            "loading": loading, "reader": reader}


def rss_over_generation(model_name: str, tokens: int) -> dict:
    """Resident set before and after a ``tokens``-token generation with a host budget of a quarter of the
    experts (the disk tier) and prefetch: a leak would grow it."""
    from moe_offload.loading.config import OffloadConfig
    from moe_offload.loading.parts import ModelParts

    plan = ModelParts(model_name, OffloadConfig(device="cpu"), weights=False).plan
    host = max(plan.experts_per_layer, plan.num_experts // 4) * plan.bytes_per_expert
    model = moe_offload.from_pretrained(model_name, device="cpu", progress=False, expert_slots=plan.num_experts // 4,
                                        host_memory=host, predictor="cross_layer")
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    model.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    before = rss_bytes()
    model.generate(prompt, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens, pad_token_id=0)
    after = rss_bytes()
    reads = int(model.offload.stats.disk_reads.sum())
    model.offload.close()
    return {"model": model_name, "host_memory_bytes": host, "tokens": tokens, "rss_before": before,
            "rss_after": after, "rss_change": after / before - 1.0, "disk_reads": reads}


def isolated(fn, *args) -> dict:
    """``fn(*args)`` in a fresh process, so its resident set is its own."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main(args: argparse.Namespace) -> int:
    from moe_offload.loading.checkpoint import resolve_model_dir

    run = BenchRun.start(args)
    path = resolve_model_dir(args.model)
    files = shards(path)
    start = time.perf_counter()
    reads = measure_reads(path, files, args.rounds, args.in_flight)
    sequential = reads["sequential"]
    print(f"sequential read (median of {args.rounds}): {sequential['bytes'] / 1e9:.2f} GB in "
          f"{sequential['seconds']:.2f} s = {sequential['gbps']:.2f} GB/s")
    print_table(reads["loading"], [("path", "load path", ""), ("seconds", "seconds", ".2f"),
                                   ("share_of_sequential", "x of cat's speed", ".2f")])
    print_table(reads["reader"], [("in_flight", "in flight", "d"), ("gbps", "GB/s", ".2f"),
                                  ("share_of_sequential", "x sequential", ".2f")])
    runs = [(None, "none"), (args.host_memory, "none"), (args.host_memory, "cross_layer")]
    # each row in its own process (its resident set its own); a smoke run keeps one process for them (the RSS
    # check below still runs isolated) to spare CI three interpreter start-ups
    where = (lambda fn, *a: fn(*a)) if args.smoke else isolated
    decoded = [where(decode, path, files, host, predictor, args.tokens, args.expert_slots) for host, predictor in runs]
    print_table(decoded, [("host_memory", "host memory", ""), ("predictor", "prefetch", ""),
                          ("ms_per_token", "ms/token", ".1f"), ("host_hit_rate", "host hits", ".1%"),
                          ("disk_bytes_per_token", "disk B/token", ".3e"), ("demand_bytes_per_token", "demand B/token", ".3e"),
                          ("disk_prefetches", "read ahead", "d"), ("prefetch_used", "used", "d"),
                          ("read_wait_s_per_token", "wait s/token", ".3f"), ("read_hidden_s_per_token", "hidden s/token", ".3f"),
                          ("rss_overhead_bytes", "RSS over budget B", ".3e")])
    rss = isolated(rss_over_generation, args.rss_model, args.rss_tokens)
    print(f"RSS over {rss['tokens']} tokens of {rss['model']} at a quarter of the experts in host memory: "
          f"{rss['rss_before'] / 2**20:.0f} -> {rss['rss_after'] / 2**20:.0f} MiB ({rss['rss_change']:+.1%}), "
          f"{rss['disk_reads']} disk reads")
    result = {"model": str(path), "checkpoint_bytes": sum(f.stat().st_size for f in files),
              "host_memory_bytes": parse_bytes(args.host_memory), **reads, "decode": decoded, "rss": rss,
              "seconds": time.perf_counter() - start}
    out = run.write_json("disk_tier.json", result)
    plot(result, run.path("disk_tier.png"))
    print(f"wrote {out} and .png")
    return 0


# The shipped bf16 tiny-mixtral (48 experts of 240 KiB): host memory for about half of them.
SMOKE = {"model": "tiny-mixtral", "host_memory": "6MiB", "tokens": 2, "in_flight": [1, 2], "rounds": 1,
         "rss_tokens": 4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a checkpoint from bench/full_size.py (required but with --smoke)")
    p.add_argument("--host-memory", default="2GiB", help="host budget of the disk-tier rows")
    p.add_argument("--expert-slots", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8, help="decode tokens per row")
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the read and load measurements")
    p.add_argument("--rss-model", default="tiny-mixtral", help="model of the RSS-over-a-generation check")
    p.add_argument("--rss-tokens", type=int, default=256)
    args = parse_bench_args(p, argv, SMOKE)
    if args.model is None:
        p.error("--model is required (a checkpoint from bench/full_size.py)")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
