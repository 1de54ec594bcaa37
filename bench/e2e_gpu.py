"""Side by side in one process: the offloading designs people use, at the same GPU memory budget.

    python bench/full_size.py --preset mixtral-8x7b --layers 8 --out /data/mixtral-l8
    python bench/e2e_gpu.py --model /data/mixtral-l8 --budgets 0.25,0.5

Rows (each at every budget, budget = dense + KV reserve + a fraction of all routed experts):
  accelerate     transformers + accelerate device_map="auto", max_memory = budget (the default people start from)
  lru-demand     our engine, LRU cache, demand copies only, no prefetch, no CPU (mixtral-offloading's design)
  cpu-moe        every routed expert on the CPU kernels (llama.cpp --cpu-moe)
  static-hot     the hottest experts pinned in the slots, the rest on the CPU (kTransformers); hot = most selected
                 in the replayed trace, or with --native-routing in a recorded forward pass over the prompt
  full           score cache + prefetch + hybrid CPU/GPU scheduler (moe-offload)
Routing is replayed from a synthetic trace shaped like the model (bench/routing_replay.py) unless
--native-routing; the JSON says which. Budgets come from the memory plan (no model is loaded to size
them). The accelerate row needs the bench extra: pip install -e ".[bench]"; without it the row is
skipped with a note. Writes bench/results/e2e-<gpu>.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_offload  # noqa: E402
from moe_offload.loading.budget import MemoryPlan  # noqa: E402
from moe_offload.loading.checkpoint import resolve_model_dir  # noqa: E402
from moe_offload.loading.config import OffloadConfig  # noqa: E402
from moe_offload.loading.parts import ModelParts  # noqa: E402

from common import BenchRun, close_offloaded, device_name, median, parse_bench_args, print_table  # noqa: E402
from routing_replay import RoutingReplay, model_trace  # noqa: E402

ACCELERATE_MISSING = 'accelerate is not installed: pip install -e ".[bench]" for the accelerate row'

DESIGNS = {
    "lru-demand": dict(cache_policy="lru", cpu_experts="never", predictor="none"),
    "cpu-moe": dict(cpu_experts="always", predictor="none"),
    "static-hot": dict(cpu_experts="always", predictor="none", cache_policy="lru"),
    "full": dict(cpu_experts="auto"),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_h2d_gbps(nbytes: int = 1 << 30) -> float:
    """Pinned host -> device bandwidth of one large copy: the ceiling for expert copies."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        times.append(time.perf_counter() - t0)
    return nbytes / median(times[1:]) / 1e9


def measure(model, replay, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Median prefill and decode tokens/s under routing replay (rewound per run)."""
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            if replay:
                replay.rewind()
            sync()
            t0 = time.perf_counter()
            model(prompt)
            sync()
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(prompt[:, :8], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
            sync()
            decode.append((time.perf_counter() - t0) / new_tokens)
    return {"prefill_tokens_per_s": prompt.shape[1] / median(prefill[1:]),
            "decode_tokens_per_s": 1 / median(decode[1:])}


def hottest_counts(counts: np.ndarray, slots: int) -> list[tuple[int, int]]:
    """(layer, expert) pairs of a [L, E] selection-count table, most selected first."""
    order = np.argsort(-counts, axis=None, kind="stable")[:slots]
    return [divmod(int(i), counts.shape[1]) for i in order]


def hottest(trace, slots: int) -> list[tuple[int, int]]:
    """(layer, expert) pairs by how often the trace selects them, most first."""
    counts = np.zeros((trace.num_layers, trace.num_experts), dtype=np.int64)
    for layer in range(trace.num_layers):
        np.add.at(counts[layer], trace.expert_ids[:, layer].reshape(-1), 1)
    return hottest_counts(counts, slots)


class RoutingCounts:
    """RouterTap listener: how often each (MoE layer, expert) is selected."""

    def __init__(self, num_layers: int, num_experts: int):
        self.counts = np.zeros((num_layers, num_experts), dtype=np.int64)   # [L, E]

    def __call__(self, layer: int, gate_input: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        np.add.at(self.counts[layer], chosen.reshape(-1).cpu().numpy(), 1)


def recorded_hot(model, prompt: torch.Tensor, slots: int) -> list[tuple[int, int]]:
    """Hot experts from the model's own routing of one forward pass over the prompt."""
    off = model.offload
    recorder = RoutingCounts(off.store.num_layers, off.store.num_experts)
    off.router_tap.add(recorder)
    try:
        with torch.inference_mode():
            model(prompt)
    finally:
        off.router_tap.remove(recorder)
    if not recorder.counts.any():
        raise RuntimeError("static-hot: recording the prompt's routing saw no router call")
    return hottest_counts(recorder.counts, slots)


def budget_bytes(plan: MemoryPlan, fraction: float) -> int:
    """Dense + KV reserve + workspace + ``fraction`` of all routed experts (rounded to the nearest slot)."""
    return int(plan.fixed_bytes + fraction * plan.expert_bytes + plan.bytes_per_expert // 2)


def accelerate_available() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def run_design(name: str, path: Path, budget: int, args, trace, prompt: torch.Tensor) -> tuple[dict, object]:
    if name == "accelerate":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                                     max_memory={0: budget, "cpu": args.host_memory}).eval()
        return model, (RoutingReplay(model, trace) if trace is not None else None)
    model = moe_offload.from_pretrained(path, device=args.device, gpu_memory=budget, progress=False,
                                        **DESIGNS[name])
    if name == "static-hot":
        slots = model.offload.plan.slots
        hot = hottest(trace, slots) if trace is not None else recorded_hot(model, prompt, slots)
        model.offload.preload(hot)
        model.offload.reset_stats()
    copier = getattr(model.offload.engine, "copier", None)
    if copier is not None:
        copier.timing = True
    return model, (RoutingReplay(model, trace) if trace is not None else None)


def row_for(name: str, fraction: float, model, replay, args, prompt, peak: float) -> dict:
    result = measure(model, replay, prompt, args.new_tokens, args.repeats)
    row = {"design": name, "budget_fraction": fraction} | result
    if hasattr(model, "offload"):
        stats = model.offload.stats
        copier = getattr(model.offload.engine, "copier", None)
        cuda = torch.device(args.device).type == "cuda"
        copy_s = copier.copy_seconds() if cuda and copier is not None else float("nan")
        copied = float(stats.bytes_copied.sum())
        row |= {"hit_rate": stats.hit_rate, "cpu_experts": int(stats.cpu_experts.sum()),
                "gb_copied": copied / 1e9, "copy_gbps": copied / copy_s / 1e9 if copy_s > 0 else float("nan")}
        row["copy_efficiency"] = row["copy_gbps"] / peak if peak == peak else float("nan")
    return row


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({r["budget_fraction"] for r in rows})
    designs = list(dict.fromkeys(r["design"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s")):
        width = 0.8 / len(designs)
        for i, design in enumerate(designs):
            values = [next((r[key] for r in rows if r["design"] == design and r["budget_fraction"] == f), 0)
                      for f in fractions]
            ax.bar(np.arange(len(fractions)) + i * width, values, width, label=design)
        ax.set_xticks(np.arange(len(fractions)) + 0.4 - width / 2, [f"{f:.0%} of experts" for f in fractions])
        ax.set_ylabel(key.replace("_", " ").replace("tokens per s", "tokens/s"))
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def designs_to_run(args) -> tuple[list[str], list[str]]:
    """The designs that can run here, and a note for each one skipped."""
    names, notes = [], []
    for name in args.designs.split(","):
        if name == "accelerate" and torch.device(args.device).type != "cuda":
            notes.append("accelerate: skipped, needs a CUDA device")
        elif name == "accelerate" and not accelerate_available():
            notes.append(f"accelerate: skipped, {ACCELERATE_MISSING}")
        elif name != "accelerate" and name not in DESIGNS:
            raise SystemExit(f"unknown design {name!r}; choose from accelerate,{','.join(DESIGNS)}")
        else:
            names.append(name)
    return names, notes


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    path = resolve_model_dir(args.model)
    designs, notes = designs_to_run(args)
    for note in notes:
        print(note, flush=True)
    peak = peak_h2d_gbps()
    torch.manual_seed(0)
    prompt = torch.randint(0, 1000, (1, args.prompt_tokens), device=args.device)
    parts = ModelParts(path, OffloadConfig(device=args.device, expert_slots=1))
    plan = parts.plan
    # One synthetic trace shaped like the model's routers, read off the meta skeleton.
    trace = None if args.native_routing else model_trace(parts.model, args.trace_tokens, args.skew, args.repeat,
                                                         args.cross_layer, seed=0)
    del parts
    rows = []
    for fraction in [float(f) for f in args.budgets.split(",")]:
        budget = budget_bytes(plan, fraction)
        for name in designs:
            model, replay = run_design(name, path, budget, args, trace, prompt)
            try:
                rows.append(row_for(name, fraction, model, replay, args, prompt, peak))
            finally:
                if replay is not None:
                    replay.remove()
                close_offloaded(model)
            print(f"  {name} @ {fraction:.0%}: {rows[-1]['prefill_tokens_per_s']:.1f} prefill tok/s, "
                  f"{rows[-1]['decode_tokens_per_s']:.2f} decode tok/s", flush=True)
            del model, replay
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(f"{args.model} on {device_name(args.device)}; pinned H2D peak {peak:.1f} GB/s; "
          f"routing {'native' if args.native_routing else 'replayed (synthetic)'}")
    print_table(rows, [("design", "design", ""), ("budget_fraction", "budget", ".0%"),
                       ("prefill_tokens_per_s", "prefill tok/s", ".1f"), ("decode_tokens_per_s", "decode tok/s", ".2f")])
    name = device_name(args.device)
    out = run.write_json(f"e2e-{name}.json", {"model": str(args.model), "device": name, "h2d_peak_gbps": peak,
                     "routing": "native" if args.native_routing else
                     f"replay: synthetic skew={args.skew} repeat={args.repeat} cross_layer={args.cross_layer}",
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "notes": notes,
                     "memory_plan": plan.describe(), "results": rows})
    if rows and not args.no_plot:
        plot(rows, run.path(f"e2e-{name}.png"))
    print(f"wrote {out}")
    return 0


# Every design but accelerate (CUDA only) on the CPU, at one budget, with replayed routing.
SMOKE = {"model": "tiny-mixtral", "device": "cpu", "budgets": "0.5", "designs": "lru-demand,cpu-moe,static-hot,full",
         "prompt_tokens": 8, "new_tokens": 2, "repeats": 1, "trace_tokens": 256}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory or shipped model (required but with --smoke)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budgets", default="0.25,0.5")
    p.add_argument("--designs", default="accelerate,lru-demand,cpu-moe,static-hot,full")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--native-routing", action="store_true", help="keep the model's own router choices")
    p.add_argument("--trace-tokens", type=int, default=8192)
    p.add_argument("--skew", type=float, default=1.0)
    p.add_argument("--repeat", type=float, default=0.3)
    p.add_argument("--cross-layer", type=float, default=0.5)
    p.add_argument("--host-memory", default="100GiB", help="accelerate's CPU max_memory")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parse_bench_args(p, argv, SMOKE)
    if args.model is None:
        p.error("--model is required")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
