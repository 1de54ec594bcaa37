"""Host -> device copy bandwidth per block size: pageable, pinned, registered, and our copy engine.

    python bench/transfer_bw.py [--sizes-mb 1,4,16,64,256] [--device cuda]

Prints a table and writes bench/results/transfer-<device>.json and .png. On a
machine without CUDA it measures host memcpy into a host "slot" (the CPU path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_offload.runtime.calibrate import median_seconds  # noqa: E402
from moe_offload.transfer import CopyEngine, ExpertShape, HostExpertStore  # noqa: E402
from moe_offload.transfer.pinning import pinned_empty  # noqa: E402

from common import BenchRun, device_name, parse_bench_args, print_table  # noqa: E402


def timed_gbps(copy, nbytes: int, device: torch.device, repeats: int) -> float:
    return nbytes / median_seconds(copy, device, repeats) / 1e9


def sources(nbytes: int, device: torch.device) -> dict[str, torch.Tensor]:
    out = {"pageable": torch.empty(nbytes, dtype=torch.uint8)}
    if device.type == "cuda":
        out["pinned"] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        registered, how = pinned_empty((nbytes,), torch.uint8)
        if how == "registered":
            out["registered"] = registered
    return out


def engine_gbps(nbytes: int, device: torch.device, repeats: int) -> float:
    """Our CopyEngine: one expert-sized block per demand copy, 4 slots round-robin."""
    hidden = 1024
    inter = max(1, nbytes // (3 * hidden * 2))
    store = HostExpertStore(1, 4, ExpertShape(hidden, inter), torch.bfloat16, pin=device.type == "cuda")
    slots = torch.empty((4, store.shape.numel), dtype=torch.bfloat16, device=device)
    engine = CopyEngine(store, slots)

    def copy_all():
        for key in range(4):
            engine.copy(key, key)
        engine.synchronize()

    return timed_gbps(copy_all, 4 * store.bytes_per_expert, device, repeats)


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    device = torch.device(args.device)
    rows = []
    for size_mb in [float(s) for s in args.sizes_mb.split(",")]:
        nbytes = int(size_mb * 2**20)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        row = {"block_mb": size_mb}
        for kind, src in sources(nbytes, device).items():
            row[f"{kind}_gbps"] = timed_gbps(lambda: dst.copy_(src, non_blocking=True), nbytes, device, args.repeats)
        row["engine_gbps"] = engine_gbps(nbytes, device, args.repeats)
        rows.append(row)
    columns = [("block_mb", "block MB", ".0f")] + [(k, k.replace("_gbps", " GB/s"), ".2f")
                                                   for k in rows[0] if k.endswith("_gbps")]
    print(f"host -> {device_name(args.device)} copy bandwidth, median of {args.repeats}")
    print_table(rows, columns)
    name = f"transfer-{device_name(args.device)}"
    out = run.write_json(f"{name}.json", {"device": device_name(args.device), "results": rows})
    plot(rows, run.path(f"{name}.png"))
    print(f"wrote {out}")
    return 0


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in [k for k in rows[0] if k.endswith("_gbps")]:
        ax.plot([r["block_mb"] for r in rows], [r[key] for r in rows], marker="o", label=key.removesuffix("_gbps"))
    ax.set_xscale("log")
    ax.set_xlabel("block size (MB)")
    ax.set_ylabel("GB/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


SMOKE = {"sizes_mb": "1,4", "repeats": 2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes-mb", default="1,4,16,64,256")
    p.add_argument("--repeats", type=int, default=5)
    return parse_bench_args(p, argv, SMOKE)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
