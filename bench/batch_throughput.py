"""Offline batch throughput: `generate_batch` at batch sizes 1, 16, 64, 256 on the shipped tiny models with 25%
of the experts in device slots (CPU).

    python bench/batch_throughput.py [--models tiny-mixtral,tiny-deepseek] [--batches 1,16,64,256]
                                     [--max-tokens 32] [--serve-load bench/results/serve_load.json]

Per model and batch size B: B prompts (held-out stdlib files; at least ``--min-prompts``, so B = 1 runs
several one after another), each generating ``--max-tokens`` greedy tokens with at most B sequences at once; generated
tokens/s over the whole run (prefill included), decode steps, mean sequences per decode step, and the
expert bytes copied into the slots per generated token. Every expert a step needs crosses once per
forward, whatever the number of sequences that use it, so bytes per token should fall about as 1/B until
every step needs every expert. Checks printed (not asserted): bytes/token at the largest B <= 1/16 of
B = 1, and tokens/s at the largest B against 4x the best level of a `serve_load.py` JSON (when one is
given or in bench/results). Writes batch_throughput.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_offload  # noqa: E402
from moe_offload.corpus import stdlib_prompts  # noqa: E402

from common import RESULTS, BenchRun, close_offloaded, parse_bench_args, print_table  # noqa: E402


def load(args: argparse.Namespace, name: str):
    """``name`` on the CPU with ``args.fraction`` of its routed experts in slots."""
    probe = moe_offload.from_pretrained(name, device=args.device, dtype=args.dtype, expert_slots=1, progress=False)
    slots = max(1, round(args.fraction * probe.offload.plan.num_experts))
    close_offloaded(probe)
    return moe_offload.from_pretrained(name, device=args.device, dtype=args.dtype, expert_slots=slots,
                                       progress=False)


def measure(model, prompts: list[str], batch: int, max_tokens: int) -> dict:
    """One `generate_batch` run of ``prompts`` with at most ``batch`` sequences at once."""
    model.offload.reset_stats()
    start = time.perf_counter()
    results = moe_offload.generate_batch(model, prompts, max_tokens=max_tokens, batch_size=batch, progress=False)
    wall = time.perf_counter() - start
    tokens = sum(r.completion_tokens for r in results)
    copied = int(model.offload.stats.bytes_copied.sum())
    return {"batch": batch, "prompts": len(prompts), "generated_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "bytes_copied": copied, "bytes_per_token": copied / tokens,
            "prompt_tokens": sum(r.prompt_tokens for r in results)}


def run_model(args: argparse.Namespace, name: str) -> dict:
    model = load(args, name)
    try:
        plan = model.offload.plan
        warm = stdlib_prompts(2, held_out=True, lines=args.prompt_lines)
        moe_offload.generate_batch(model, warm, max_tokens=2, batch_size=2, progress=False)  # kernels, caches
        levels = []
        for batch in args.batches:
            prompts = stdlib_prompts(max(batch, args.min_prompts), held_out=True, lines=args.prompt_lines)
            levels.append(measure(model, prompts, batch, args.max_tokens))
            print(f"  {name} B={batch}: {levels[-1]['tokens_per_s']:.1f} tok/s", flush=True)
        return {"model": name, "slots": plan.slots, "experts": plan.num_experts, "bytes_per_expert":
                plan.bytes_per_expert, "levels": levels}
    finally:
        close_offloaded(model)


def serve_best(path: Path | None) -> dict | None:
    """The best aggregate tokens/s of a serve_load JSON, per budget and overall (None without one)."""
    if path is None or not path.exists():
        return None
    data = json.loads(path.read_text())
    best = {b["budget"]: max(lv["tokens_per_s"] for lv in b["levels"]) for b in data["budgets"]}
    return {"file": str(path), "model": data["model"], "best_by_budget": best, "best": max(best.values())}


def checks(models: list[dict], serve: dict | None) -> list[dict]:
    """The issue's two checks per model: bytes/token at the largest B vs B = 1, tokens/s vs serve_load."""
    rows = []
    for m in models:
        first, last = m["levels"][0], m["levels"][-1]
        row = {"model": m["model"], "largest_batch": last["batch"],
               "bytes_ratio": last["bytes_per_token"] / first["bytes_per_token"] if first["bytes_per_token"] else None,
               "speedup_vs_b1": last["tokens_per_s"] / first["tokens_per_s"]}
        if serve is not None and serve["model"] == m["model"]:
            row["vs_serve_best"] = last["tokens_per_s"] / serve["best"]
            row["vs_serve_best_25"] = last["tokens_per_s"] / serve["best_by_budget"].get("25%", float("nan"))
        rows.append(row)
    return rows


def plot(path: Path, models: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed_ax, copy_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for m in models:
        batches = [lv["batch"] for lv in m["levels"]]
        label = f"{m['model']} ({m['slots']}/{m['experts']} slots)"
        speed_ax.plot(batches, [lv["tokens_per_s"] for lv in m["levels"]], marker="o", label=label)
        copy_ax.plot(batches, [lv["bytes_per_token"] / 2**10 for lv in m["levels"]], marker="o", label=label)
    speed_ax.set(xlabel="batch size B", ylabel="generated tokens / s", title="throughput (prefill included)")
    copy_ax.set(xlabel="batch size B", ylabel="KiB of experts copied / generated token", title="expert copies")
    for ax in (speed_ax, copy_ax):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    torch.manual_seed(0)
    models = [run_model(args, name) for name in args.models]
    rows = [{"model": m["model"], **lv} for m in models for lv in m["levels"]]
    print(f"CPU, {args.dtype}, {args.fraction:.0%} of experts in slots, {args.max_tokens} greedy tokens per prompt, "
          f"prompts of {args.prompt_lines} stdlib lines")
    print_table(rows, [("model", "model", ""), ("batch", "B", "d"), ("prompts", "prompts", "d"),
                       ("generated_tokens", "tokens", "d"), ("wall_s", "wall s", ".2f"),
                       ("tokens_per_s", "tok/s", ".1f"), ("bytes_per_token", "bytes copied/token", ".0f")])
    serve = serve_best(Path(args.serve_load) if args.serve_load else None)
    found = checks(models, serve)
    for c in found:
        line = (f"{c['model']}: bytes/token at B={c['largest_batch']} = {c['bytes_ratio']:.4f} of B=1 "
                f"({'<=' if c['bytes_ratio'] <= 1 / 16 else '>'} 1/16); tokens/s {c['speedup_vs_b1']:.1f}x B=1")
        if "vs_serve_best" in c:
            line += (f"; {c['vs_serve_best']:.2f}x serve_load's best ({c['vs_serve_best_25']:.2f}x its best at 25%"
                     " of experts; the check asks >= 4x)")
        print(line)
    out = run.write_json("batch_throughput.json", {
        "device": args.device, "dtype": args.dtype, "fraction": args.fraction, "max_tokens": args.max_tokens,
        "prompt_lines": args.prompt_lines, "models": models, "serve_load": serve, "checks": found})
    plot(run.path("batch_throughput.png"), models, f"generate_batch on the CPU, {args.dtype}, "
         f"{args.fraction:.0%} of experts in slots, {args.max_tokens} tokens per prompt")
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda t: t.split(","), default=["tiny-mixtral", "tiny-deepseek"])
    p.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1, 16, 64, 256])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-lines", type=int, default=6, help="lines of a stdlib file per prompt")
    p.add_argument("--min-prompts", type=int, default=4, help="prompts per level at least (B = 1 runs them in turn)")
    p.add_argument("--fraction", type=float, default=0.25, help="share of routed experts in device slots")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    default_serve = RESULTS / "serve_load.json"
    p.add_argument("--serve-load", default=str(default_serve) if default_serve.exists() else None,
                   help="a serve_load.py JSON to compare with (default bench/results/serve_load.json if present)")
    return parse_bench_args(p, argv, {"batches": [1, 3], "max_tokens": 2, "prompt_lines": 2, "min_prompts": 2,
                                            "serve_load": None})


if __name__ == "__main__":
    sys.exit(main(parse_args()))
