"""Projected decode tokens/s against the expert budget, with budgeted prefetch and promotion, per shape and GPU.

    python bench/prefetch_budget.py                      # the three shape presets on rtx4090-pcie4 and h100-pcie5
    python bench/prefetch_budget.py --tokens 200 --shapes mixtral-8x7b --profiles rtx4090-pcie4

For each shape preset (config.json only: no weights) and hardware profile the
simulator replays one synthetic decode trace shaped like the model, with the
locality of the shipped models' real routing (moe_offload.simulate.sweep
SYNTHETIC_LOCALITY), through the runtime's call protocol: CPU experts 'auto',
promotion on, prefetch depth 8. Rows: static placement (no prefetch, no
promotion: the cache freezes after warm-up), no prefetch (promotion only),
oracle@0.5, oracle@0.8 and the oracle, under the score policy (the runtime's
default), and LRU, the frequency oracle (knows how often the trace selects
each expert, not when: the most an online policy can learn of a stationary
routing) and Belady with and without the oracle. ``link_bound``:
the most prefetch can buy over static placement when every call's time is
CPU-run misses and the link is never idle, 1 + (CPU time of one expert) /
(copy time of one expert): while the CPU runs an expert the link can bring
that fraction of another one in. ``freq_gain`` and ``belady_gain``: what the
oracle's prefetch buys over no prefetch under the frequency oracle and under
Belady. Ratios compare rows of the same run.
Writes bench/results/prefetch_budget.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tqdm import tqdm  # noqa: E402

from moe_offload.loading.config import OffloadConfig  # noqa: E402
from moe_offload.loading.parts import ModelParts  # noqa: E402
from moe_offload.models import SHAPE_PRESETS  # noqa: E402
from moe_offload.predictor import make_predictor  # noqa: E402
from moe_offload.predictor.synthetic import SyntheticTraceConfig, synthetic_trace  # noqa: E402
from moe_offload.runtime.cost import CostModel, HardwareProfile  # noqa: E402
from moe_offload.simulate import RoutingArrays, Simulator  # noqa: E402
from moe_offload.simulate.sweep import SYNTHETIC_LOCALITY  # noqa: E402

from common import BenchRun, parse_bench_args, print_table  # noqa: E402

BUDGETS = (0.10, 0.25, 0.50, 0.75)
RUNS = [("score", p) for p in ("static", "none", "oracle@0.5", "oracle@0.8", "oracle")] + \
       [(policy, p) for policy in ("lru", "frequency", "belady") for p in ("none", "oracle")]
DEPTH = 8


def shape_trace(parts: ModelParts, tokens: int):
    skew, repeat, cross_layer = SYNTHETIC_LOCALITY
    return synthetic_trace(SyntheticTraceConfig(tokens=tokens, layers=len(parts.sites), experts=parts.num_experts,
                                                top_k=parts.hf_config.num_experts_per_tok, skew=skew, repeat=repeat,
                                                cross_layer=cross_layer))


def run_shape(shape: str, profile: str, tokens: int, bar) -> list[dict]:
    parts = ModelParts(shape, OffloadConfig(device="cpu"), weights=False)
    trace = shape_trace(parts, tokens)
    cost = CostModel.for_expert(HardwareProfile.from_yaml(profile), parts.shape.hidden, parts.shape.intermediate,
                                parts.dtype.itemsize)
    routing = RoutingArrays.of(trace)
    rows = []
    for policy, predictor in RUNS:
        maker = None if predictor in ("none", "static") else \
            (lambda name=predictor: make_predictor(name, replay_trace=trace))
        simulator = Simulator(routing, cost, parts.plan.bytes_per_expert, "auto", predictor=maker,
                              prefetch_depth=DEPTH, promote=predictor != "static")
        for share in BUDGETS:
            slots = max(1, round(share * parts.plan.num_experts))
            result = simulator.run(policy, slots)
            rows.append({"shape": shape, "hardware": profile, "policy": policy, "predictor": predictor,
                         "link_bound": 1.0 + cost.cpu_s(1) / cost.copy_s(),
                         "budget_fraction": share, "slots": slots, "hit_rate": result.hit_rate,
                         "tokens_per_s": result.tokens_per_s, "prefetch_copies": result.prefetch_copies,
                         "prefetch_used": result.prefetch_used, "promotions": result.promotions,
                         "bytes_copied_per_token": result.bytes_copied_per_token})
            bar.update()
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    """Per shape, hardware and budget: each score row's tokens/s over score without prefetch (promotion on)
    and over static placement (neither prefetch nor promotion)."""
    def base(name):
        return {(r["shape"], r["hardware"], r["budget_fraction"]): r["tokens_per_s"] for r in rows
                if (r["policy"], r["predictor"]) == ("score", name)}
    none, static = base("none"), base("static")
    by_run = {(r["shape"], r["hardware"], r["budget_fraction"], r["policy"], r["predictor"]): r["tokens_per_s"]
              for r in rows}
    out = []
    for r in rows:
        if r["policy"] == "score" and r["predictor"] != "static":
            key = (r["shape"], r["hardware"], r["budget_fraction"])
            gain = {policy: by_run[(*key, policy, "oracle")] / by_run[(*key, policy, "none")]
                    for policy in ("frequency", "belady")}
            out.append({"shape": r["shape"], "hardware": r["hardware"], "budget": f"{100 * r['budget_fraction']:.0f}%",
                        "predictor": r["predictor"], "speedup": r["tokens_per_s"] / none[key],
                        "over_static": r["tokens_per_s"] / static[key], "link_bound": r["link_bound"],
                        "freq_gain": gain["frequency"], "belady_gain": gain["belady"]})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["shape"], r["hardware"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (shape, hardware) in zip(axes[0], panels):
        for policy, predictor in RUNS:
            mine = [r for r in rows if (r["shape"], r["hardware"], r["policy"], r["predictor"]) ==
                    (shape, hardware, policy, predictor)]
            ax.plot([100 * r["budget_fraction"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o",
                    linestyle="-" if policy == "score" else ":", label=f"{policy} + {predictor}")
        ax.set(title=f"{shape}\n{hardware}", xlabel="expert slots (% of experts)", ylabel="decode tokens/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    start = time.perf_counter()
    rows = []
    total = len(args.shapes) * len(args.profiles) * len(RUNS) * len(BUDGETS)
    with tqdm(total=total, desc="simulated runs", unit="run") as bar:
        for shape in args.shapes:
            for profile in args.profiles:
                rows += run_shape(shape, profile, args.tokens, bar)
    gains = speedups(rows)
    print_table(gains, [("shape", "shape", ""), ("hardware", "hardware", ""), ("budget", "budget", ""),
                        ("predictor", "predictor", ""), ("speedup", "x no prefetch", ".2f"),
                        ("over_static", "x static", ".2f"), ("link_bound", "bound", ".2f"),
                        ("freq_gain", "frequency", ".2f"), ("belady_gain", "belady", ".2f")])
    out = run.write_json("prefetch_budget.json", {
        "tokens": args.tokens, "prefetch_depth": DEPTH, "cpu_experts": "auto", "locality": SYNTHETIC_LOCALITY,
        "seconds": time.perf_counter() - start, "speedups": gains, "results": rows})
    plot(rows, run.path("prefetch_budget.png"))
    print(f"wrote {out} and .png")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPE_PRESETS), choices=SHAPE_PRESETS)
    p.add_argument("--profiles", nargs="+", default=["rtx4090-pcie4", "h100-pcie5"])
    p.add_argument("--tokens", type=int, default=300, help="decode tokens in each trace")
    return parse_bench_args(p, argv, {"shapes": ["mixtral-8x7b"], "profiles": ["rtx4090-pcie4"], "tokens": 8})


if __name__ == "__main__":
    sys.exit(main(parse_args()))
