"""Projected offline throughput (module-based batching) by batch size, against the physical bound.

    python bench/offline_projection.py                 # Mixtral-8x7B and DeepSeek-V2-Lite, RTX 4090 and H100, bf16 and int4
    python bench/offline_projection.py --smoke --out /tmp/x

For each model shape, hardware profile (with its GPU memory and a host memory) and expert format, the
simulator projects offline tokens/s at B = 1, 16, 64, 256, 1024 sequences per step
(``moe_offload.simulate.plan.plan_offline``, what ``moe-offload plan --batch`` prints): the runtime's score
cache and hybrid scheduler over a synthetic trace with the shipped models' locality, prefetching with
oracle@0.8, each sequence 512 prompt + 256 new tokens, the batch's KV in host memory counted against the host
memory. Next to each: the physical bound (the fewest expert fetches, Belady's, over the link and the CPU in
parallel, or the FLOPs) and the bound that also reads the host KV once per step. Prints a table, writes
offline_projection.json and a PNG (tokens/s against B, one panel per model and GPU). Simulated: no timing
of this machine enters the numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import BenchRun, parse_bench_args, print_table  # noqa: E402

from moe_offload.loading.config import parse_bytes  # noqa: E402
from moe_offload.simulate.offline import OfflineSetup  # noqa: E402
from moe_offload.simulate.plan import PlanRequest, plan_offline  # noqa: E402

MACHINES = {"rtx4090-pcie4": ("24GiB", "64GiB"), "h100-pcie5": ("80GiB", "256GiB")}   # GPU memory, host memory
FORMATS = {"bf16": None, "int4": "int4"}
CHECK = ("mixtral-8x7b", "rtx4090-pcie4", "int4")   # best B within 1.5x of the physical bound


def project(model: str, hardware: str, fmt: str, offline: OfflineSetup, progress: bool) -> list[dict]:
    gpu, host = MACHINES[hardware]
    request = PlanRequest(model, parse_bytes(gpu), parse_bytes(host), hardware, progress=progress)
    choices = plan_offline(request, offline, formats=(FORMATS[fmt],))
    rows = []
    for choice in choices:
        base = {"model": model, "hardware": hardware, "gpu_memory": gpu, "host_memory": host, "experts": fmt,
                "batch": choice.batch}
        r = choice.best
        if r is None:
            rows.append(base | {"fits": False, "note": choice.rows[0]["note"] if choice.rows else "does not fit"})
            continue
        rows.append(base | {k: r[k] for k in ("fits", "tokens_per_s", "bound_tokens_per_s", "of_bound",
                                              "bound_kv_tokens_per_s", "of_bound_kv", "hit_rate",
                                              "bytes_copied_per_token", "attention_on", "host_kv_bytes",
                                              "host_expert_rows", "slots", "expert_s", "attention_s", "dense_s")})
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (model, hardware, experts): the batch size with the most tokens/s."""
    best = {}
    for r in rows:
        if r["fits"]:
            key = (r["model"], r["hardware"], r["experts"])
            if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                best[key] = r
    return list(best.values())


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["hardware"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (model, hardware) in zip(axes[0], panels):
        for fmt in FORMATS:
            mine = [r for r in rows if (r["model"], r["hardware"], r["experts"]) == (model, hardware, fmt) and r["fits"]]
            if not mine:
                continue
            x = [r["batch"] for r in mine]
            line, = ax.plot(x, [r["tokens_per_s"] for r in mine], marker="o", label=f"{fmt} projected")
            ax.plot(x, [r["bound_tokens_per_s"] for r in mine], linestyle="--", color=line.get_color(),
                    label=f"{fmt} bound")
            ax.plot(x, [r["bound_kv_tokens_per_s"] for r in mine], linestyle=":", color=line.get_color(),
                    label=f"{fmt} bound + host KV")
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens / s",
               title=f"{model}, {hardware}\n{MACHINES[hardware][0]} GPU, {MACHINES[hardware][1]} host", )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("offline throughput by batch size (simulated)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    offline = OfflineSetup(tuple(int(b) for b in args.batches.split(",")), args.prompt_tokens, args.new_tokens)
    rows = [row for model in args.models.split(",") for hardware in args.hardware.split(",")
            for fmt in args.formats.split(",") for row in project(model, hardware, fmt, offline, not args.quiet)]
    columns = [("model", "model", "s"), ("hardware", "hardware", "s"), ("experts", "experts", "s"),
               ("batch", "B", "d"), ("tokens_per_s", "tokens/s", ".1f"), ("bound_tokens_per_s", "bound", ".1f"),
               ("of_bound", "of bound", ".0%"), ("bound_kv_tokens_per_s", "bound+KV", ".1f"),
               ("of_bound_kv", "of +KV", ".0%"), ("attention_on", "attention", "s")]
    print_table([r for r in rows if r["fits"]], columns)
    for r in rows:
        if not r["fits"]:
            print(f"{r['model']} {r['hardware']} {r['experts']} B={r['batch']}: does not fit ({r['note']})")
    best = best_rows(rows)
    checks = {}
    for r in best:
        print(f"best B for {r['model']} {r['hardware']} {r['experts']}: {r['batch']}, {r['tokens_per_s']:.1f} tokens/s, "
              f"{r['bound_tokens_per_s'] / r['tokens_per_s']:.2f}x below the bound "
              f"({r['bound_kv_tokens_per_s'] / r['tokens_per_s']:.2f}x below the bound with the host KV)")
        if (r["model"], r["hardware"], r["experts"]) == CHECK:
            checks = {"best_batch": r["batch"], "bound_over_projected": r["bound_tokens_per_s"] / r["tokens_per_s"],
                      "bound_kv_over_projected": r["bound_kv_tokens_per_s"] / r["tokens_per_s"]}
    run.path("offline_projection.png").parent.mkdir(parents=True, exist_ok=True)
    plot(run.path("offline_projection.png"), rows)
    payload = {"setup": {"prompt_tokens": offline.prompt_tokens, "new_tokens": offline.new_tokens,
                         "batches": list(offline.batches), "machines": MACHINES, "policy": "score",
                         "predictor": "oracle@0.8", "cpu_experts": "auto"},
               "results": rows, "best": best, "check_mixtral_int4_rtx4090": checks}
    print(f"wrote {run.write_json('offline_projection.json', payload)}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mixtral-8x7b,deepseek-v2-lite")
    parser.add_argument("--hardware", default=",".join(MACHINES))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--batches", default="1,16,64,256,1024")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sys.exit(main(parse_bench_args(parser, None, {"models": "deepseek-v2-lite", "hardware": "rtx4090-pcie4",
                                                  "formats": "int4", "batches": "4,64", "quiet": True})))
