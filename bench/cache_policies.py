"""Expert-cache hit rate per policy, slot allocation and budget, with Belady's optimum as the bound.

    python bench/cache_policies.py [--models tiny-mixtral,tiny-deepseek] [--prompts 24] [--new-tokens 64]
                                   [--synthetic-tokens 4096] [--budgets 10,25,50,75]

Traces: (a) greedy generation of each shipped model on held-out standard-library
prompts (skipped, with a note, when the model is not shipped in this checkout);
(b) a long synthetic trace (predictor.synthetic: Zipf skew 1.0 with a random
per-layer permutation, repeat probability 0.3; 16 MoE layers x 64 experts,
top-4; sequences of 512 tokens, the first 32 of each a prompt). Every trace is
replayed by the cache simulator (the runtime's ExpertCache and policies) from
a cold cache. "score" is the default score policy (each layer duels p = 2k
against p = k); "score-p=2k" fixes HybriMoE's p = 2 * top_k and "score-p=k"
credits exactly the selected experts (p = top_k). The "dp" allocation's per-layer miss curves are measured on
the first half of each trace. On the synthetic trace an "oracle-online" reference, which
knows the generating process but not its random draws, shows how much of the
gap to Belady any online policy could close. On the models' traces "lru+prefetch" and
"score+prefetch" add the runtime's prefetcher with the model's learned predictor (one layer
ahead, top-k experts per token; moe_offload.replay_prefetch), prefetched experts taken as landed
in time: a prefetched expert its layer selects counts as a hit. Belady is the bound without
prefetch. Prints one table per trace and allocation and writes bench/results/cache_policies.json
and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_offload.cache import (  # noqa: E402
    FrequencyOraclePolicy,
)
from moe_offload.predictor.synthetic import SyntheticTraceConfig, synthetic_trace  # noqa: E402
from moe_offload.simulate import RoutingArrays, Simulator, lru_miss_curves  # noqa: E402

from common import BenchRun, parse_bench_args  # noqa: E402

POLICIES = ("lru", "lfu", "arc", "score", "belady")
ALLOCATIONS = ("global", "uniform")
ALLOCATION_STUDY = ("shallow", "dp")   # run for the score policy only
SCORE_FIXED = {"score-p=2k": 2, "score-p=k": 1}   # score with top_p fixed at this many times top_k
SYNTHETIC_REPEAT = 0.3
PREFETCHED = ("lru", "score")          # policies also run with the learned predictor's prefetch


def selection_frequency(trace) -> np.ndarray:
    """[K] share of tokens whose top-k includes each flat expert id."""
    layers, experts = trace.num_layers, trace.num_experts
    keys = trace.expert_ids.astype(np.int64) + (np.arange(layers) * experts)[None, :, None]   # [N, L, k]
    return np.bincount(keys.ravel(), minlength=layers * experts) / trace.num_tokens


def model_trace(name: str, prompts: int, new_tokens: int):
    """(routing trace with gate inputs on held-out prompts, predictor maker) of a shipped model,
    or None when it is not shipped. The maker builds the model's learned predictor."""
    from transformers import AutoTokenizer

    import moe_offload
    from moe_offload.corpus import stdlib_prompts
    from moe_offload.loading.router_params import router_params
    from moe_offload.models import shipped_model_dir
    from moe_offload.predictor import make_predictor
    from moe_offload.runtime.tracing import record_trace

    path = shipped_model_dir(name)
    if path is None:
        return None
    model = moe_offload.from_pretrained(path, device="cpu", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    trace = record_trace(model, tokenizer, stdlib_prompts(prompts, held_out=True), new_tokens, gate_inputs=True,
                         progress=False)
    params = router_params(model).to("cpu")
    return trace, lambda: make_predictor("learned", params, model_dir=path)


def long_synthetic(tokens: int):
    return synthetic_trace(SyntheticTraceConfig(tokens=tokens, layers=16, experts=64, top_k=4, skew=1.0,
                                                repeat=SYNTHETIC_REPEAT, tokens_per_sequence=512, prompt_tokens=32,
                                                seed=0))


def run_trace(trace, budgets: list[int], synthetic: bool, predictor=None) -> list[dict]:
    """Every policy x allocation x budget on one trace (and the process oracle on synthetic ones);
    ``predictor``: makes a fresh predictor for the prefetching runs (none: no such runs)."""

    routing = RoutingArrays.of(trace)
    fit = routing.select_tokens(routing.num_tokens // 2)   # dp's miss curves come from the first half
    simulator = Simulator(routing, miss_curves=lru_miss_curves(fit))
    prefetching = None if predictor is None else Simulator(routing, predictor=predictor)
    layout = simulator.layout
    runs = [(p, a) for a in ALLOCATIONS for p in POLICIES] + [("score", a) for a in ALLOCATION_STUDY]
    runs += [(name, a) for a in ALLOCATIONS for name in SCORE_FIXED]
    runs += [("oracle-online", a) for a in ALLOCATIONS] if synthetic else []
    runs += [(f"{p}+prefetch", a) for a in ALLOCATIONS for p in PREFETCHED] if prefetching else []
    frequency = selection_frequency(trace) if synthetic else None
    rows = []
    for policy, allocation in runs:
        for percent in budgets:
            slots = max(1, round(percent / 100 * layout.num_keys))
            if allocation != "global" and slots < layout.num_layers:
                continue   # a per-layer split needs a slot per layer
            start = time.perf_counter()
            if policy == "oracle-online":
                oracle = FrequencyOraclePolicy(layout, repeat=SYNTHETIC_REPEAT, rates=frequency)
                result = simulator.run(oracle, slots, allocation)
            elif policy.endswith("+prefetch"):
                result = prefetching.run(policy.removesuffix("+prefetch"), slots, allocation)
            elif policy in SCORE_FIXED:
                result = simulator.run("score", slots, allocation, top_p=SCORE_FIXED[policy] * layout.top_k)
            else:
                result = simulator.run(policy, slots, allocation)
            rows.append({"policy": policy, "allocation": allocation, "budget_percent": percent, "slots": slots,
                         "hit_rate": result.hit_rate, "hits": result.hits, "misses": result.misses,
                         "replay_s": time.perf_counter() - start})
    return rows


def gaps(rows: list[dict], budgets: list[int]) -> dict:
    """Hit-rate points of score minus Belady and minus LRU, per allocation and budget."""
    rate = {(r["policy"], r["allocation"], r["budget_percent"]): r["hit_rate"] for r in rows}
    out = {}
    for allocation in ALLOCATIONS:
        for percent in budgets:
            if ("score", allocation, percent) in rate:
                score = rate[("score", allocation, percent)]
                out[f"{allocation}/{percent}%"] = {
                    "score_minus_belady_points": 100 * (score - rate[("belady", allocation, percent)]),
                    "score_minus_lru_points": 100 * (score - rate[("lru", allocation, percent)]),
                }
                if ("score+prefetch", allocation, percent) in rate:
                    out[f"{allocation}/{percent}%"]["with_prefetch_score_minus_lru_points"] = 100 * (
                        rate[("score+prefetch", allocation, percent)] - rate[("lru+prefetch", allocation, percent)])
    return out


def print_tables(name: str, summary: dict, rows: list[dict], budgets: list[int]) -> None:
    print(f"\n## {name}: {summary['tokens']} tokens ({summary['decode_tokens']} generated), "
          f"{summary['layers']} MoE layers x {summary['experts']} experts, top-{summary['top_k']}")
    for allocation in (*ALLOCATIONS, *ALLOCATION_STUDY):
        mine = [r for r in rows if r["allocation"] == allocation]
        if not mine:
            continue
        print(f"\nhit rate (%), allocation {allocation}")
        print(f"{'policy':>16}" + "".join(f"{str(b) + '%':>9}" for b in budgets))
        for policy in dict.fromkeys(r["policy"] for r in mine):
            cells = {r["budget_percent"]: 100 * r["hit_rate"] for r in mine if r["policy"] == policy}
            print(f"{policy:>16}" + "".join(f"{cells[b]:>9.1f}" if b in cells else f"{'-':>9}" for b in budgets))
        if allocation in ALLOCATIONS:
            for label, key in (("score - belady", "score_minus_belady_points"),
                               ("score - lru", "score_minus_lru_points"),
                               ("(prefetch) s-l", "with_prefetch_score_minus_lru_points")):
                cells = {b: summary["gaps"].get(f"{allocation}/{b}%", {}).get(key) for b in budgets}
                if all(v is None for v in cells.values()):
                    continue
                print(f"{label:>16}" + "".join(f"{v:>+9.1f}" if v is not None else f"{'-':>9}" for v in cells.values()))


def plot(path: Path, traces: dict, budgets: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(traces)
    fig, axes = plt.subplots(len(names), len(ALLOCATIONS), figsize=(5.2 * len(ALLOCATIONS), 3.6 * len(names)),
                             squeeze=False)
    for i, name in enumerate(names):
        for j, allocation in enumerate(ALLOCATIONS):
            ax = axes[i][j]
            rows = [r for r in traces[name]["results"] if r["allocation"] == allocation]
            for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] not in SCORE_FIXED):
                mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["budget_percent"])
                ax.plot([r["budget_percent"] for r in mine], [100 * r["hit_rate"] for r in mine], marker="o",
                        label=policy, linestyle=":" if policy.endswith("+prefetch") else
                        "-" if policy in POLICIES[:-1] else "--")
            ax.set(title=f"{name}, {allocation} slots", xlabel="expert slots (% of routed experts)",
                   ylabel="hit rate (%)", xticks=budgets)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(trace, rows: list[dict], budgets: list[int]) -> dict:
    return {"tokens": int(trace.num_tokens), "decode_tokens": int(np.sum(trace.decode)), "layers": trace.num_layers,
            "experts": trace.num_experts, "top_k": trace.top_k, "results": rows, "gaps": gaps(rows, budgets)}


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    budgets = [int(b) for b in args.budgets.split(",")]
    sources, notes = {}, []
    for name in (m for m in args.models.split(",") if m):
        traced = model_trace(name, args.prompts, args.new_tokens)
        if traced is None:
            notes.append(f"{name}: not shipped in this checkout (moe_offload/models/{name} missing); skipped")
            print(f"[bench] {notes[-1]}")
            continue
        sources[name] = traced
    sources[f"synthetic-{args.synthetic_tokens}"] = (long_synthetic(args.synthetic_tokens), None)
    traces = {}
    for name, (trace, predictor) in sources.items():
        rows = run_trace(trace, budgets, synthetic=name.startswith("synthetic"), predictor=predictor)
        traces[name] = summarize(trace, rows, budgets)
        print_tables(name, traces[name], rows, budgets)
    out = run.write_json("cache_policies.json", {"budgets_percent": budgets, "notes": notes, "traces": traces})
    plot(run.path("cache_policies.png"), traces, budgets)
    print(f"\nwrote {out} and .png")
    return 0


SMOKE = {"models": "tiny-mixtral", "prompts": 1, "new_tokens": 4, "synthetic_tokens": 64, "budgets": "25"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mixtral,tiny-deepseek", help="shipped models to trace (comma list)")
    p.add_argument("--prompts", type=int, default=24, help="held-out stdlib prompts per model")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    p.add_argument("--synthetic-tokens", type=int, default=4096)
    p.add_argument("--budgets", default="10,25,50,75", help="expert slots as %% of routed experts")
    return parse_bench_args(p, argv, SMOKE)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
