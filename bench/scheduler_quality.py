"""How close the hybrid scheduler gets to the best placement, against HybriMoE's plain greedy.

    python bench/scheduler_quality.py [--layers 2000]

Random MoE layers with real expert shapes and shipped hardware profiles: token
counts per selected expert drawn for decode (1-4 tokens) and prefill (512
tokens spread Zipf-like over up to 12 experts), residency random at a 25%
or 50% hit rate. For each layer the finish time of the greedy alone, of greedy
plus the improvement pass, and of the best of all 2^misses placements (exact,
brute force over every
device/CPU split, resident experts included; layers of more than 12 experts are skipped). Prints a table and writes bench/results/scheduler_quality.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_offload.runtime.cost import CostModel, HardwareProfile  # noqa: E402
from moe_offload.runtime.scheduler import ExpertLoad, _makespan, plan_layer  # noqa: E402

from common import BenchRun, parse_bench_args, print_table  # noqa: E402

SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "deepseek-v2-lite": (2048, 1408, 64, 6),
          "qwen3-30b-a3b": (2048, 768, 128, 8)}


def best_finish(loads: list[ExpertLoad], costs) -> float:
    """Exact optimum over every device/CPU split of the layer's experts (resident ones included)."""
    best = float("inf")
    for pick in itertools.product((False, True), repeat=len(loads)):
        device = [m for m, c in zip(loads, pick) if not c]
        cpu = [m for m, c in zip(loads, pick) if c]
        best = min(best, _makespan(device, cpu, costs, 0.0))
    return best


def random_layer(rng, experts: int, top_k: int, phase: str, hit: float) -> list[ExpertLoad]:
    if phase == "decode":
        tokens = int(rng.integers(1, 5))
        chosen = np.unique(np.concatenate([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]))
        counts = {int(e): 0 for e in chosen}
        for _ in range(tokens * top_k):
            counts[int(rng.choice(chosen))] += 1
    else:
        pool = rng.choice(experts, min(experts, 12), replace=False)
        weights = 1.0 / np.arange(1, len(pool) + 1)
        draws = rng.choice(pool, 512 * top_k, p=weights / weights.sum())
        counts = {int(e): int(c) for e, c in zip(*np.unique(draws, return_counts=True))}
    return [ExpertLoad(e, c, resident=bool(rng.random() < hit)) for e, c in counts.items() if c > 0]


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    rng = np.random.default_rng(0)
    rows = []
    for profile_name in ("rtx4090-pcie4", "h100-pcie5"):
        profile = HardwareProfile.from_yaml(profile_name)
        for model, (hidden, inter, experts, top_k) in SHAPES.items():
            costs = CostModel.for_expert(profile, hidden, inter, 2)
            for phase in ("decode", "prefill"):
                ratios_g, ratios_r, better = [], [], 0
                for _ in range(args.layers):
                    loads = random_layer(rng, experts, top_k, phase, hit=float(rng.choice([0.25, 0.5])))
                    if len(loads) > 12:
                        continue
                    best = best_finish(loads, costs)
                    greedy = plan_layer(loads, costs, refine=False).finish_s
                    refined = plan_layer(loads, costs).finish_s
                    ratios_g.append(greedy / best)
                    ratios_r.append(refined / best)
                    better += refined < greedy - 1e-12
                rows.append({"hardware": profile_name, "model": model, "phase": phase, "layers": len(ratios_g),
                             "greedy_vs_best": float(np.mean(ratios_g)), "greedy_worst": float(np.max(ratios_g)),
                             "ours_vs_best": float(np.mean(ratios_r)), "ours_worst": float(np.max(ratios_r)),
                             "ours_better_share": better / len(ratios_g)})
    print_table(rows, [("hardware", "hardware", ""), ("model", "model", ""), ("phase", "phase", ""),
                       ("greedy_vs_best", "greedy/best", ".4f"), ("greedy_worst", "worst", ".3f"),
                       ("ours_vs_best", "ours/best", ".4f"), ("ours_worst", "worst", ".3f"),
                       ("ours_better_share", "ours better", ".1%")])
    out = run.write_json("scheduler_quality.json", {"layers": args.layers, "results": rows,
                     "note": "finish time of one layer relative to the exact optimum (1.0 = optimal)"})
    print(f"wrote {out}")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=500)
    return parse_bench_args(p, argv, {"layers": 5})


if __name__ == "__main__":
    sys.exit(main(parse_args()))
