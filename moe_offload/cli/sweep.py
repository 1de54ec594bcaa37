"""`moe-offload sweep`: hit rate, bytes copied and tokens/s against the expert-cache budget, per policy.

    moe-offload sweep --model tiny-mixtral --budgets 10%,25%,50%,75%,100% --policies lru,score,arc --out DIR
    moe-offload sweep --model M --simulate --hardware h100-pcie5 --trace T.npz --policies lru,score,belady --out DIR
    moe-offload sweep --model M --simulate --synthetic --budgets 4GiB,8GiB --out DIR
    moe-offload sweep --model mixtral-8x7b --simulate --predictor none,oracle,oracle@0.8 --budgets 25%,50% --out DIR

Without --simulate every (policy, budget) loads the model on the local device
and generates greedily from a few prompts, timing it and reading
``model.offload.stats``; Belady needs the future and is skipped there. With
--simulate a routing trace (--trace, --synthetic, or else recorded now from
the same prompts) is replayed through the simulator and costed with a
hardware profile, with the runtime's defaults on a GPU (CPU experts auto, the
cross-layer predictor when the trace has gate inputs and the model its
router weights), which it prints. A model directory with config.json only, or
a shape preset (mixtral-8x7b, deepseek-v2-lite, qwen3-30b-a3b), is simulated
on a synthetic trace. Writes DIR/sweep.csv, DIR/sweep.json and DIR/sweep.png.

Budgets and result fields: see moe_offload.simulate.sweep.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import replace
from pathlib import Path

import torch

from ..cache import ALLOCATIONS, POLICIES, SIMULATION_ONLY
from ..errors import MoEOffloadError
from ..loading.config import OffloadConfig, check_predictor, device_defaults
from ..predictor.registry import NO_PREDICTOR, PREDICTOR_NAMES, predictor_entry
from ..runtime.scheduler import CPU_EXPERTS
from ..simulate.sweep import (
    SweepSetup,
    default_predictor,
    engine_rows,
    parse_budgets,
    runnable,
    simulate_offline_rows,
    simulate_rows,
    sweep_prompts,
    sweep_trace,
)
from ..simulate.offline import OfflineSetup, parse_batches
from .argtypes import positive_int

DEFAULT_BUDGETS = "10%,25%,50%,75%,100%"
DEFAULT_POLICIES = "lru,score,arc,belady"
RESULT_FIELDS = ("policy", "predictor", "budget", "slots", "budget_bytes", "budget_fraction", "hit_rate",
                 "bytes_copied_per_token", "tokens_per_s", "host_memory", "disk_bytes_per_token",
                 "demand_bytes_per_token")
OFFLINE_FIELDS = ("batch", "fits", "bound_tokens_per_s", "of_bound", "bound_kv_tokens_per_s", "of_bound_kv", "step_s", "expert_s", "attention_s",
                  "attention_on", "dense_s", "missing_experts_per_step", "host_kv_bytes", "host_expert_rows", "note")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``sweep`` subcommand."""
    p = subparsers.add_parser("sweep", help="hit rate and tokens/s against the expert-cache budget, per policy")
    p.add_argument("--model", default="tiny-mixtral",
                   help="checkpoint directory, shipped model name, or (with --simulate) a directory with config.json "
                        "only or a shape preset: mixtral-8x7b, deepseek-v2-lite, qwen3-30b-a3b")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS,
                   help=f"comma list of N%% or sizes like 6GiB (default {DEFAULT_BUDGETS.replace('%', '%%')})")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help=f"comma list of {', '.join([*POLICIES, *SIMULATION_ONLY])} ({DEFAULT_POLICIES})")
    simulated = [name for name, allocation in ALLOCATIONS.items() if allocation.needs_miss_curves]
    p.add_argument("--allocation", default="global", choices=list(ALLOCATIONS),
                   help=f"slots per MoE layer ({', '.join(simulated)}: simulation only)")
    p.add_argument("--simulate", action="store_true", help="replay a routing trace instead of running the model")
    p.add_argument("--hardware", default="rtx4090-pcie4",
                   help="hardware profile name or YAML, for --simulate (default rtx4090-pcie4)")
    p.add_argument("--cpu-experts", choices=CPU_EXPERTS,
                   help="miss placement: the hybrid scheduler (auto), copy every miss (never), every miss on the "
                        "CPU (always); default: auto with --simulate, else the runtime's default for the device")
    p.add_argument("--predictor",
                   help=f"comma list of predictors to prefetch with, one row each: {', '.join(PREDICTOR_NAMES)}, "
                        f"{NO_PREDICTOR}, or oracle@R (the oracle kept at recall R); with --simulate the runtime's "
                        "prefetcher replays them over the trace (default: the runtime's on a GPU, cross_layer, when "
                        "the trace and model allow it, else none), else the engine's (default: the device's)")
    p.add_argument("--prefetch-depth", type=positive_int,
                   help="layers ahead to prefetch (default: the runtime's on a GPU, searched over the shipped models' "
                        "routing: configs/runtime-defaults.yaml)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--trace", help="routing trace .npz from `moe-offload trace` (with --simulate)")
    source.add_argument("--synthetic", action="store_true", help="a synthetic trace shaped like the model")
    p.add_argument("--synthetic-tokens", type=positive_int, default=4096)
    p.add_argument("--prompts", type=positive_int, default=4,
                   help="prompts per run (stdlib text with a tokenizer, else random)")
    p.add_argument("--prompt-tokens", type=positive_int, default=64, help="tokens per prompt")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated per prompt")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", help="float32, float16, bfloat16 (default: the checkpoint's)")
    p.add_argument("--expert-dtype", help="stored format of the routed experts: int8, int4, int4-g32, int4-g128, fp8 or a "
                                          "float dtype (default: --dtype); sizes slots, copies and CPU reads")
    p.add_argument("--host-memory", help="with --simulate: host memory budgets for experts, e.g. 64GiB,128GiB,all "
                                         "(below the experts: the disk tier); one set of rows each (default: all)")
    p.add_argument("--disk-gbps", type=float, help="with --simulate: the disk's read GB/s (default: the profile's)")
    p.add_argument("--batch", metavar="B[,B2,...]",
                   help="with --simulate: project offline throughput at these batch sizes (module-based batching: "
                        "B sequences decoded together, their KV in host memory counted against --host-memory), "
                        "one row per batch size with its physical bound")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="with --simulate: run the grid's cells as Ray tasks, on a local Ray or the cluster at "
                        "ADDRESS (pip install 'moe-offload[ray]'); default: a process pool over this machine's cores")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=main)


def parse_policies(text: str, simulate: bool) -> tuple[list[str], list[str]]:
    """(policies to run, notes about skipped ones)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES and p not in SIMULATION_ONLY]
    if unknown or not names:
        known = ", ".join([*POLICIES, *SIMULATION_ONLY])
        raise MoEOffloadError(f"unknown cache policies {unknown}; choose from {known}")
    if simulate:
        return names, []
    skipped = [p for p in names if p in SIMULATION_ONLY]
    notes = [f"{p}: needs the future routing, simulation only (use --simulate); skipped" for p in skipped]
    return [p for p in names if p not in SIMULATION_ONLY], notes


def write_csv(path: Path, rows: list[dict]) -> None:
    offline = any("batch" in r for r in rows)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS + (OFFLINE_FIELDS if offline else ()), restval="",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(path: Path, rows: list[dict], title: str) -> None:
    """Two panels against the budget (% of routed experts): hit rate, tokens/s; one line per policy (and
    predictor, when the sweep ran several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hit_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    multi = len({r["predictor"] for r in rows}) > 1
    hosts = len({r.get("host_memory", "all") for r in rows}) > 1
    for policy, predictor, host in dict.fromkeys((r["policy"], r["predictor"], r.get("host_memory", "all"))
                                                 for r in rows):
        mine = sorted((r for r in rows if (r["policy"], r["predictor"], r.get("host_memory", "all")) ==
                       (policy, predictor, host)), key=lambda r: r["budget_fraction"])
        x = [100 * r["budget_fraction"] for r in mine]
        label = (f"{policy} + {predictor}" if multi else policy) + (f", host {host}" if hosts else "")
        style = dict(marker="o", label=label, linestyle="--" if policy in SIMULATION_ONLY else "-")
        hit_ax.plot(x, [100 * r["hit_rate"] for r in mine], **style)
        speed_ax.plot(x, [r["tokens_per_s"] for r in mine], **style)
    hit_ax.set(xlabel="expert slots (% of routed experts)", ylabel="hit rate (%)", title="cache hit rate")
    speed_ax.set(xlabel="expert slots (% of routed experts)", ylabel="tokens / s", title="throughput")
    for ax in (hit_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sweep.csv", payload["results"])
    (out / "sweep.json").write_text(json.dumps(payload, indent=2) + "\n")
    how = "simulated" if payload["simulated"] else "measured"
    if any("batch" in r for r in payload["results"]):
        plot_offline(out / "sweep.png", payload["results"],
                     f"{Path(payload['model']).name} on {payload['hardware']}: offline tokens/s by batch size "
                     f"(simulated; CPU experts: {payload['cpu_experts']})")
        return
    plot_sweep(out / "sweep.png", payload["results"],
               f"{Path(payload['model']).name} on {payload['hardware']} ({how}; prefetch: {payload['predictor']}, "
               f"CPU experts: {payload['cpu_experts']})")


def plot_offline(path: Path, rows: list[dict], title: str) -> None:
    """Offline tokens/s against the batch size (log-log), one line per (policy, budget, predictor, host
    memory), each with its physical bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    fitting = [r for r in rows if r.get("fits", True)]
    for key in dict.fromkeys((r["policy"], r["budget"], r["predictor"], r["host_memory"]) for r in fitting):
        mine = sorted((r for r in fitting if (r["policy"], r["budget"], r["predictor"], r["host_memory"]) == key),
                      key=lambda r: r["batch"])
        x = [r["batch"] for r in mine]
        line, = ax.plot(x, [r["tokens_per_s"] for r in mine], marker="o",
                        label=f"{key[0]}, {key[1]} slots, {key[2]}, host {key[3]}")
        ax.plot(x, [r["bound_tokens_per_s"] for r in mine], linestyle="--", color=line.get_color(), alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="batch size (sequences per step)", ylabel="tokens / s",
           title="projected (solid) and physical bound (dashed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_offline_rows(rows: list[dict]) -> None:
    print(f"{'policy':>8} {'budget':>8} {'host':>8} {'batch':>6} {'tokens/s':>10} {'bound':>10} {'of bound':>8} "
          f"{'hit rate':>9} {'MB/token':>9} {'attention':>9} {'host KV GiB':>11}")
    for r in rows:
        if not r.get("fits", True):
            print(f"{'':>8} {'':>8} {r['host_memory']:>8} {r['batch']:>6}  does not fit: {r['note']}")
            continue
        print(f"{r['policy']:>8} {r['budget']:>8} {r['host_memory']:>8} {r['batch']:>6} {r['tokens_per_s']:>10.1f} "
              f"{r['bound_tokens_per_s']:>10.1f} {r['of_bound']:>8.0%} {r['hit_rate']:>9.1%} "
              f"{r['bytes_copied_per_token'] / 1e6:>9.2f} {r['attention_on']:>9} {r['host_kv_bytes'] / 2**30:>11.1f}")


def print_rows(rows: list[dict]) -> None:
    if any("batch" in r for r in rows):
        return print_offline_rows(rows)
    print(f"{'policy':>8} {'predictor':>12} {'budget':>8} {'slots':>6} {'host':>8} {'hit rate':>9} {'MB/token':>10} "
          f"{'disk MB/t':>10} {'waited MB/t':>11} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['policy']:>8} {r['predictor']:>12} {r['budget']:>8} {r['slots']:>6} {r.get('host_memory', 'all'):>8} "
              f"{r['hit_rate']:>9.1%} {r['bytes_copied_per_token'] / 1e6:>10.3f} "
              f"{r.get('disk_bytes_per_token', 0.0) / 1e6:>10.1f} {r.get('demand_bytes_per_token', 0.0) / 1e6:>11.1f} "
              f"{r['tokens_per_s']:>10.2f}")


def parse_host_budgets(text: str | None, simulate: bool) -> tuple:
    """'64GiB,all' -> (('64GiB', bytes), ('all', None))."""
    if text is None:
        return (("all", None),)
    if not simulate:
        raise MoEOffloadError("--host-memory lists host budgets for --simulate; to run with one, use "
                              "moe-offload run --host-memory")
    from ..loading.config import parse_bytes

    labels = [t.strip() for t in text.split(",") if t.strip()]
    return tuple((label, None if label == "all" else parse_bytes(label)) for label in labels)


def parse_predictors(text: str | None, simulate: bool) -> list[str] | None:
    """The --predictor list (None: the default); names the registry does not know are refused."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise MoEOffloadError("--predictor needs at least one name")
    for name in names:
        if name != NO_PREDICTOR:
            try:
                predictor_entry(name)
            except ValueError as err:
                raise MoEOffloadError(str(err)) from None
        if not simulate:
            check_predictor(name)   # the engine runs runtime predictors only
    return names


def simulate_all(parts, setup: SweepSetup, runs, notes: list[str], predictors: list[str] | None,
                 ray_address: str | None = None, offline: OfflineSetup | None = None):
    """Rows of every predictor's runs over one trace (with ``offline``: per batch size); the predictors run
    (the default resolved)."""
    trace = sweep_trace(parts, setup)
    names = predictors or [default_predictor(parts, trace, notes)]
    if offline is not None:
        return simulate_offline_rows(parts, setup, offline, runs, notes, trace, names, ray_address), names
    return simulate_rows(parts, setup, runs, notes, trace, names, ray_address), names


def main(args: argparse.Namespace) -> int:
    from ..loading.parts import ModelParts, has_weights

    cfg = OffloadConfig(device=args.device) if args.device else OffloadConfig()
    cfg = cfg.replace(dtype=args.dtype) if args.dtype else cfg
    cfg = cfg.replace(expert_dtype=args.expert_dtype) if args.expert_dtype else cfg
    if ALLOCATIONS[args.allocation].needs_miss_curves and not args.simulate:
        raise MoEOffloadError(f"--allocation {args.allocation} needs miss curves from a trace; use it with --simulate")
    if args.ray is not None and not args.simulate:
        raise MoEOffloadError("--ray runs simulated cells; add --simulate")
    if args.batch is not None and not args.simulate:
        raise MoEOffloadError("--batch projects offline batches with the simulator; add --simulate "
                              "(to run a batch job, use moe-offload batch)")
    if (args.trace or args.synthetic) and not args.simulate:
        raise MoEOffloadError("--trace and --synthetic replay a trace; add --simulate")
    predictors = parse_predictors(args.predictor, args.simulate)
    if args.prefetch_depth is None:
        args.prefetch_depth = device_defaults("cuda")["prefetch_depth"]
    weights = has_weights(args.model)
    if not weights and not args.simulate:
        raise MoEOffloadError(f"{args.model} has config.json only (no weights): add --simulate to project it")
    parts = ModelParts(args.model, cfg, weights=weights)
    policies, notes = parse_policies(args.policies, args.simulate)
    budgets = parse_budgets(args.budgets, parts)
    synthetic = args.synthetic or (args.simulate and not weights and not args.trace)
    if synthetic and not args.synthetic:
        notes.append(f"{args.model} has no weights to trace: replayed a synthetic trace of {args.synthetic_tokens} "
                     "tokens shaped like it")
    prompts = [] if args.trace or synthetic else sweep_prompts(parts, args.prompts, args.prompt_tokens)
    gpu = device_defaults("cuda")
    cpu_experts = args.cpu_experts or (gpu["cpu_experts"] if args.simulate else cfg.resolved_cpu_experts)
    gate_inputs = any(predictor_entry(n).needs_gate_inputs for n in predictors or [gpu["predictor"]]
                      if n != NO_PREDICTOR)
    setup = SweepSetup(args.model, cfg.device, args.dtype, args.allocation, prompts, args.new_tokens, cfg.progress,
                       cpu_experts, None, args.trace, args.synthetic_tokens if synthetic else 0, args.hardware,
                       args.prefetch_depth, gate_inputs, expert_dtype=cfg.expert_dtype,
                       host_budgets=parse_host_budgets(args.host_memory, args.simulate), disk_gbps=args.disk_gbps)
    runs = runnable(parts, setup, policies, budgets, notes)
    if args.simulate:
        offline = None if args.batch is None else OfflineSetup(parse_batches(args.batch), args.prompt_tokens,
                                                                args.new_tokens)
        rows, predictors = simulate_all(parts, setup, runs, notes, predictors, args.ray, offline)
        hardware = Path(args.hardware).stem
    else:
        rows = [row for name in predictors or [None] for row in engine_rows(parts, replace(setup, predictor=name),
                                                                            runs)]
        hardware = torch.cuda.get_device_name(cfg.torch_device) if cfg.on_cuda else "cpu"
    defaults = f"experts {parts.format.name}, CPU experts {cpu_experts}, predictor {', '.join(predictors or [cfg.resolved_predictor])}, " \
               f"prefetch depth {args.prefetch_depth}"
    payload = {"model": str(args.model), "hardware": hardware, "simulated": bool(args.simulate),
               "allocation": args.allocation, "cpu_experts": cpu_experts,
               "predictor": ",".join(predictors or [cfg.resolved_predictor]), "prefetch_depth": args.prefetch_depth,
               "notes": notes, "results": rows}
    write_outputs(Path(args.out), payload)
    print(f"[moe-offload] {'projected' if args.simulate else 'measured'} on {hardware}: {defaults}")
    print_rows(rows)
    for note in notes:
        print(f"[moe-offload] {note}")
    print(f"[moe-offload] wrote {args.out}/sweep.csv, sweep.json, sweep.png")
    return 0
