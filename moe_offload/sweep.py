"""`moe-offload sweep`: hit rate, bytes copied and tokens/s against the expert-cache budget, per policy.

    moe-offload sweep --model tiny-mixtral --budgets 10%,25%,50%,75%,100% --policies lru,score,arc --out DIR
    moe-offload sweep --model M --simulate --hardware h100-pcie5 --trace T.npz --policies lru,score,belady --out DIR
    moe-offload sweep --model M --simulate --synthetic --budgets 4GiB,8GiB --out DIR

Without --simulate every (policy, budget) loads the model on the local device
and generates greedily from a few prompts, timing it and reading
``model.offload.stats``; Belady needs the future and is skipped there. With
--simulate a routing trace (--trace, --synthetic, or else recorded now from
the same prompts) is replayed through the cache simulator and costed with a
hardware profile. Writes DIR/sweep.csv, DIR/sweep.json and DIR/sweep.png.

Budgets: "25%" = that share of the model's routed experts get slots; "6GiB"
= total device memory, split by moe_offload.budget.plan_memory. In the
results ``budget_bytes`` is the expert cache (slots x bytes per expert) and
``budget_fraction`` = slots / routed experts. ``tokens_per_s`` counts every
processed token (prompt and generated); simulated time covers the routed
experts only.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .argtypes import positive_int
from .cache import ALLOCATIONS, POLICIES, SIMULATION_ONLY, CacheSimulator, MissPlan, RoutingArrays
from .config import OffloadConfig, parse_bytes
from .errors import MoEOffloadError
from .predictor.registry import PREDICTOR_NAMES

DEFAULT_BUDGETS = "10%,25%,50%,75%,100%"
DEFAULT_POLICIES = "lru,score,arc,belady"
RESULT_FIELDS = ("policy", "budget", "slots", "budget_bytes", "budget_fraction", "hit_rate",
                 "bytes_copied_per_token", "tokens_per_s")


@dataclass(frozen=True)
class Budget:
    label: str     # as given: "25%" or "6GiB"
    slots: int


@dataclass(frozen=True)
class SweepSetup:
    """What every run of one sweep shares."""

    model: str
    device: str
    dtype: str | None
    allocation: str
    prompts: list[torch.Tensor]      # [1, S] token ids each
    new_tokens: int
    progress: bool
    cpu_experts: str = "never"       # how misses are placed: the engine's cpu_experts mode
    predictor: str | None = None     # prefetch predictor; None: the engine's default (simulation: none)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``sweep`` subcommand."""
    p = subparsers.add_parser("sweep", help="hit rate and tokens/s against the expert-cache budget, per policy")
    p.add_argument("--model", default="tiny-mixtral", help="checkpoint directory or shipped model name")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS,
                   help=f"comma list of N%% or sizes like 6GiB (default {DEFAULT_BUDGETS.replace('%', '%%')})")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help=f"comma list of {', '.join([*POLICIES, *SIMULATION_ONLY])} ({DEFAULT_POLICIES})")
    p.add_argument("--allocation", default="global", choices=ALLOCATIONS, help="slots per MoE layer (dp: simulation)")
    p.add_argument("--simulate", action="store_true", help="replay a routing trace instead of running the model")
    p.add_argument("--hardware", default="rtx4090-pcie4",
                   help="hardware profile name or YAML, for --simulate (default rtx4090-pcie4)")
    p.add_argument("--cpu-experts", choices=("never", "auto", "always"),
                   help="miss placement: the hybrid scheduler (auto), copy every miss (never), every miss on the "
                        "CPU (always); default: auto with --simulate, else the runtime's default for the device")
    p.add_argument("--predictor", choices=("none", *PREDICTOR_NAMES),
                   help="prefetch with this predictor, one layer ahead; with --simulate the runtime's prefetcher "
                        "replays it over the trace (default: none), else the engine's (default: the device's)")
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
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=main)


def parse_budgets(text: str, parts) -> list[Budget]:
    """'10%,6GiB' -> Budgets with slot counts for the model of ``parts`` (a loader.ModelParts)."""
    from .budget import plan_memory

    plan = parts.plan
    budgets = []
    for label in (b.strip() for b in text.split(",") if b.strip()):
        if label.endswith("%"):
            try:
                share = float(label[:-1]) / 100
            except ValueError:
                raise MoEOffloadError(f"cannot read budget {label!r}; use e.g. 25% or 6GiB") from None
            if not 0 < share <= 1:
                raise MoEOffloadError(f"budget {label} must be in (0%, 100%]")
            slots = max(1, round(share * plan.num_experts))
        elif label[-1:].isalpha():
            cfg = OffloadConfig(device="cpu", gpu_memory=parse_bytes(label))
            slots = plan_memory(cfg, plan.dense_bytes, plan.bytes_per_expert, plan.num_moe_layers,
                                plan.experts_per_layer,
                                parts.adapter.kv_bytes_per_token(parts.hf_config, parts.dtype.itemsize)).slots
        else:
            raise MoEOffloadError(f"budget {label!r} needs a unit: a share like 25% or a size like 6GiB")
        budgets.append(Budget(label, slots))
    if not budgets:
        raise MoEOffloadError("no budgets given; use e.g. --budgets 10%,25%,50%")
    return budgets


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


def sweep_prompts(parts, count: int, tokens: int) -> list[torch.Tensor]:
    """[1, tokens] ids each: held-out stdlib text when the model has a tokenizer, else random ids."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(parts.directory)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if tokenizer is not None:
        from .trace_cli import stdlib_prompts

        texts = stdlib_prompts(count, held_out=True)
        return [tokenizer(text, return_tensors="pt").input_ids[:, :tokens] for text in texts]
    generator = torch.Generator().manual_seed(0)
    vocab = parts.hf_config.vocab_size
    return [torch.randint(0, vocab, (1, tokens), generator=generator) for _ in range(count)]


def result_row(policy: str, budget: Budget, plan, hit_rate: float, bytes_per_token: float,
               tokens_per_s: float) -> dict:
    return {"policy": policy, "budget": budget.label, "slots": budget.slots,
            "budget_bytes": budget.slots * plan.bytes_per_expert, "budget_fraction": budget.slots / plan.num_experts,
            "hit_rate": float(hit_rate), "bytes_copied_per_token": float(bytes_per_token),
            "tokens_per_s": float(tokens_per_s)}


def run_engine(setup: SweepSetup, policy: str, slots: int) -> tuple[float, float, float]:
    """(hit rate, bytes copied per token, tokens/s) of greedy generation on the local device."""
    from .loader import from_pretrained

    model = from_pretrained(setup.model, device=setup.device, dtype=setup.dtype, expert_slots=slots,
                            cache_policy=policy, slot_allocation=setup.allocation, cpu_experts=setup.cpu_experts,
                            predictor=setup.predictor, progress=False)
    device = model.device
    gen = dict(max_new_tokens=setup.new_tokens, min_new_tokens=setup.new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        synchronize(device)
        start = time.perf_counter()
        for ids in setup.prompts:
            model.generate(ids.to(device), **gen)
        synchronize(device)
        seconds = time.perf_counter() - start
    stats = model.offload.stats
    tokens = int(stats.tokens[0])   # token rows the first MoE layer processed: prompts + generated
    return stats.hit_rate, float(stats.bytes_copied.sum()) / tokens, tokens / seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineScheduler:
    """moe_offload's placement scheduler (copy or CPU per miss) behind the simulator's MissScheduler seam."""

    def __init__(self, mode: str):
        self.mode = mode
        self.fills_free_slots = mode == "auto"   # the engine's Engine._fill

    def plan(self, tokens, resident, cost) -> MissPlan:
        from .scheduler import COPY, CPU, RESIDENT, ExpertLoad, plan_layer

        loads = [ExpertLoad(i, n, bool(r)) for i, (n, r) in enumerate(zip(tokens, resident))]
        plan = plan_layer(loads, cost, self.mode)
        seconds = 0.0 if cost is None else plan.finish_s
        return MissPlan(tuple(plan.experts(RESIDENT) + plan.experts(COPY)), tuple(plan.experts(CPU)), seconds)


def sweep_trace(args: argparse.Namespace, parts, setup: SweepSetup):
    """The routing trace to replay: --trace, --synthetic, or recorded now from the sweep's prompts."""
    from .predictor import Trace, TraceFormatError

    layers, experts = len(parts.sites), parts.num_experts
    if args.trace:
        try:
            trace = Trace.load(args.trace)
        except TraceFormatError as err:
            raise MoEOffloadError(str(err)) from None
        if (trace.num_layers, trace.num_experts) != (layers, experts):
            raise MoEOffloadError(f"trace {args.trace} has {trace.num_layers} MoE layers x {trace.num_experts} "
                                  f"experts but the model has {layers} x {experts}; trace this model")
        return trace
    if args.synthetic:
        from .predictor.synthetic import SyntheticTraceConfig, synthetic_trace

        return synthetic_trace(SyntheticTraceConfig(tokens=args.synthetic_tokens, layers=layers, experts=experts,
                                                    top_k=parts.hf_config.num_experts_per_tok))
    return record_prompts(setup)


GATE_INPUT_PREDICTORS = ("cross_layer", "cross_layer_raw", "learned")   # they read each layer's gate input


def replay_prefetch(setup: SweepSetup, trace, model_dir: Path, notes: list[str]):
    """A maker of fresh ReplayPrefetch objects for --predictor, or None."""
    from .predictor import make_predictor
    from .replay_prefetch import ReplayPrefetch

    name = setup.predictor
    if name in (None, "none"):
        return None
    if name in GATE_INPUT_PREDICTORS and trace.gate_inputs is None:
        raise MoEOffloadError(f"--predictor {name} needs gate inputs in the trace; record it with "
                              "`moe-offload trace --gate-inputs` (a --synthetic trace has none)")
    params = model_router_params(setup) if name in GATE_INPUT_PREDICTORS else None
    if name in ("popularity", "eam"):
        notes.append(f"predictor {name} is fitted on the replayed trace itself (in-sample)")

    def make():
        try:
            predictor = make_predictor(name, params, fit_trace=trace, replay_trace=trace, model_dir=model_dir)
        except (ValueError, FileNotFoundError) as err:
            raise MoEOffloadError(f"predictor {name!r}: {err}") from None
        return ReplayPrefetch(trace, predictor)
    make()   # fail before the runs start
    return make


def model_router_params(setup: SweepSetup):
    """The model's router tensors, on the CPU (loads the model once on the CPU)."""
    from .loader import from_pretrained
    from .router_params import router_params

    model = from_pretrained(setup.model, device="cpu", dtype=setup.dtype, expert_slots=1, progress=False)
    return router_params(model).to("cpu")


def record_prompts(setup: SweepSetup):
    """Trace greedy generation from the sweep's prompts (every expert resident)."""
    from .loader import from_pretrained
    from .tracing import TraceRecorder

    model = from_pretrained(setup.model, device=setup.device, dtype=setup.dtype, progress=False)
    tap = model.offload.router_tap
    recorder = TraceRecorder(len(tap.routers), gate_inputs=setup.predictor in GATE_INPUT_PREDICTORS)
    tap.add(recorder)
    gen = dict(max_new_tokens=setup.new_tokens, min_new_tokens=setup.new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        for ids in setup.prompts:
            model.generate(ids.to(model.device), **gen)
            recorder.next_sequence()
    tap.remove(recorder)
    return recorder.trace({"model": setup.model})


def runnable(parts, setup: SweepSetup, policies: list[str], budgets: list[Budget],
             notes: list[str]) -> list[tuple[str, Budget]]:
    """(policy, budget) pairs to run; a per-layer allocation skips budgets below one slot per layer."""
    layers = len(parts.sites)
    too_small = [b for b in budgets if setup.allocation != "global" and b.slots < layers]
    for b in too_small:
        notes.append(f"{b.label}: {b.slots} slots < {layers} MoE layers, too few for the "
                     f"{setup.allocation!r} allocation; skipped")
    return [(p, b) for p in policies for b in budgets if b not in too_small]


def simulate_rows(args, parts, setup: SweepSetup, runs: list[tuple[str, Budget]], notes: list[str]) -> list[dict]:
    from .cost import CostModel, HardwareProfile

    trace = sweep_trace(args, parts, setup)
    profile = HardwareProfile.from_yaml(args.hardware)
    cost = CostModel.for_expert(profile, parts.shape.hidden, parts.shape.intermediate, parts.dtype.itemsize)
    scheduler = None if setup.cpu_experts == "never" else EngineScheduler(setup.cpu_experts)
    simulator = CacheSimulator(RoutingArrays.of(trace), cost, parts.plan.bytes_per_expert, scheduler,
                               prefetch=replay_prefetch(setup, trace, parts.directory, notes))
    rows = []
    for policy, budget in tqdm(runs, desc="sweep (simulated)", unit="run", disable=not setup.progress):
        try:
            result = simulator.run(policy, budget.slots, setup.allocation)
        except ValueError as err:
            raise MoEOffloadError(f"{policy} at {budget.label}: {err}") from None
        rows.append(result_row(policy, budget, parts.plan, result.hit_rate, result.bytes_copied_per_token,
                               result.tokens_per_s))
    return rows


def engine_rows(parts, setup: SweepSetup, runs: list[tuple[str, Budget]]) -> list[dict]:
    rows = []
    for policy, budget in tqdm(runs, desc="sweep (engine)", unit="run", disable=not setup.progress):
        hit_rate, bytes_per_token, tokens_per_s = run_engine(setup, policy, budget.slots)
        rows.append(result_row(policy, budget, parts.plan, hit_rate, bytes_per_token, tokens_per_s))
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(path: Path, rows: list[dict], title: str) -> None:
    """Two panels against the budget (% of routed experts): hit rate, tokens/s; one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hit_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["budget_fraction"])
        x = [100 * r["budget_fraction"] for r in mine]
        style = dict(marker="o", label=policy, linestyle="--" if policy in SIMULATION_ONLY else "-")
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
    plot_sweep(out / "sweep.png", payload["results"],
               f"{Path(payload['model']).name} on {payload['hardware']} ({how}; prefetch: {payload['predictor']}, "
               f"CPU experts: {payload['cpu_experts']})")


def print_rows(rows: list[dict]) -> None:
    print(f"{'policy':>8} {'budget':>8} {'slots':>6} {'hit rate':>9} {'MB/token':>10} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['policy']:>8} {r['budget']:>8} {r['slots']:>6} {r['hit_rate']:>9.1%} "
              f"{r['bytes_copied_per_token'] / 1e6:>10.3f} {r['tokens_per_s']:>10.1f}")


def main(args: argparse.Namespace) -> int:
    from .loader import ModelParts

    cfg = OffloadConfig(device=args.device) if args.device else OffloadConfig()
    cfg = cfg.replace(dtype=args.dtype) if args.dtype else cfg
    if args.allocation == "dp" and not args.simulate:
        raise MoEOffloadError("--allocation dp needs miss curves from a trace; use it with --simulate")
    if (args.trace or args.synthetic) and not args.simulate:
        raise MoEOffloadError("--trace and --synthetic replay a trace; add --simulate")
    parts = ModelParts(args.model, cfg)
    policies, notes = parse_policies(args.policies, args.simulate)
    budgets = parse_budgets(args.budgets, parts)
    prompts = [] if args.trace or args.synthetic else sweep_prompts(parts, args.prompts, args.prompt_tokens)
    cpu_experts = args.cpu_experts or ("auto" if args.simulate else cfg.cpu_mode)
    setup = SweepSetup(args.model, cfg.device, args.dtype, args.allocation, prompts, args.new_tokens, cfg.progress,
                       cpu_experts, args.predictor)
    runs = runnable(parts, setup, policies, budgets, notes)
    if args.simulate:
        rows = simulate_rows(args, parts, setup, runs, notes)
        hardware = Path(args.hardware).stem
    else:
        rows = engine_rows(parts, setup, runs)
        hardware = torch.cuda.get_device_name(cfg.torch_device) if cfg.on_cuda else "cpu"
    payload = {"model": str(args.model), "hardware": hardware, "simulated": bool(args.simulate),
               "allocation": args.allocation, "cpu_experts": cpu_experts,
               "predictor": args.predictor or ("none" if args.simulate else cfg.predictor_name),
               "notes": notes, "results": rows}
    write_outputs(Path(args.out), payload)
    print_rows(rows)
    for note in notes:
        print(f"[moe-offload] {note}")
    print(f"[moe-offload] wrote {args.out}/sweep.csv, sweep.json, sweep.png")
    return 0
