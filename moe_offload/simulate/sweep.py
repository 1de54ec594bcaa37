"""Budget sweeps: hit rate, bytes copied and tokens/s of each (policy, budget), run on the engine or simulated.

Budgets: "25%" = that share of the model's routed experts get slots; "6GiB" =
total device memory, split by loading.budget.plan_memory. In the results
``budget_bytes`` is the expert cache (slots x bytes per expert) and
``budget_fraction`` = slots / routed experts. ``tokens_per_s`` counts every
processed token (prompt and generated); simulated time covers the routed
experts only.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import MoEOffloadError
from ..loading.config import OffloadConfig, device_defaults, parse_bytes
from ..predictor.registry import NO_PREDICTOR, PREDICTORS, predictor_entry

# Locality of the synthetic traces, (skew, repeat, cross_layer) of predictor.synthetic, matched to the routing
# the shipped trained models show on held-out text (bench/results/routing-*.json): usage entropy 0.995-0.998
# of uniform (load-balanced routers: skew 0.3 gives 0.99) and consecutive tokens repeating an expert 7-11%
# more often than chance on average (up to 22% in deep layers): repeat 0.1. No cross-layer correlation is
# assumed (an oracle does not need it; a gate predictor cannot run on a synthetic trace anyway).
SYNTHETIC_LOCALITY = (0.3, 0.1, 0.0)


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
    cpu_experts: str = "never"       # how misses are placed (OffloadConfig.cpu_experts)
    predictor: str | None = None     # prefetch predictor; None: the engine's default (simulation: none)
    trace: str | None = None         # simulation: replay this trace file ...
    synthetic_tokens: int = 0        # ... or a synthetic trace of this many tokens; neither: record one now
    hardware: str = "rtx4090-pcie4"  # simulation: the hardware profile that costs the runs
    prefetch_depth: int = 1          # layers ahead the prefetcher reaches
    gate_inputs: bool = False        # record the trace with gate inputs (a gate predictor will replay it)
    locality: tuple[float, float, float] = SYNTHETIC_LOCALITY   # synthetic trace: (skew, repeat, cross_layer)
    expert_dtype: str | None = None  # the experts' stored format (OffloadConfig.expert_dtype)
    host_budgets: tuple = (("all", None),)   # simulation: (label, host memory bytes or None: every expert)
    disk_gbps: float | None = None   # simulation: the disk's read rate (default: the hardware profile's)


def parse_budgets(text: str, parts) -> list[Budget]:
    """'10%,6GiB' -> Budgets with slot counts for the model of ``parts`` (a loader.ModelParts)."""
    from ..loading.budget import plan_memory

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


def sweep_prompts(parts, count: int, tokens: int) -> list[torch.Tensor]:
    """[1, tokens] ids each: held-out stdlib text when the model has a tokenizer, else random ids."""
    from ..loading.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(parts.directory)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if tokenizer is not None:
        from ..corpus import stdlib_prompts

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
    from ..loading.loader import from_pretrained

    model = from_pretrained(setup.model, device=setup.device, dtype=setup.dtype, expert_dtype=setup.expert_dtype,
                            expert_slots=slots,
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


def sweep_trace(parts, setup: SweepSetup):
    """The routing trace to replay: ``setup.trace``, a synthetic one, or recorded now from the prompts."""
    from ..predictor import Trace, TraceFormatError

    layers, experts = len(parts.sites), parts.num_experts
    if setup.trace:
        try:
            trace = Trace.load(setup.trace)
        except TraceFormatError as err:
            raise MoEOffloadError(str(err)) from None
        if (trace.num_layers, trace.num_experts) != (layers, experts):
            raise MoEOffloadError(f"trace {setup.trace} has {trace.num_layers} MoE layers x {trace.num_experts} "
                                  f"experts but the model has {layers} x {experts}; trace this model")
        return trace
    if setup.synthetic_tokens:
        from ..predictor.synthetic import SyntheticTraceConfig, synthetic_trace

        skew, repeat, cross_layer = setup.locality
        return synthetic_trace(SyntheticTraceConfig(tokens=setup.synthetic_tokens, layers=layers, experts=experts,
                                                    top_k=parts.hf_config.num_experts_per_tok, skew=skew,
                                                    repeat=repeat, cross_layer=cross_layer))
    return record_prompts(setup)


def record_prompts(setup: SweepSetup):
    """Trace greedy generation from the sweep's prompts (every expert resident)."""
    from ..loading.loader import from_pretrained
    from ..runtime.tracing import record_trace

    model = from_pretrained(setup.model, device=setup.device, dtype=setup.dtype, progress=False)
    return record_trace(model, None, setup.prompts, setup.new_tokens, gate_inputs=setup.gate_inputs,
                        progress=False, min_new_tokens=setup.new_tokens)


GATE_INPUT_PREDICTORS = tuple(name for name, entry in PREDICTORS.items() if entry.needs_gate_inputs)


def predictor_params(setup: SweepSetup, trace, parts, notes: list[str]):
    """Check that ``setup.predictor`` can prefetch over ``trace`` for this model (else MoEOffloadError); its
    router tensors (read from the checkpoint without the experts) when it needs them, else None.

    ``parts``: the model's loader.ModelParts."""
    from ..loading.router_params import router_params
    from ..predictor import make_predictor

    name = setup.predictor
    if name in (None, NO_PREDICTOR):
        return None
    try:
        entry = predictor_entry(name)
    except ValueError as err:
        raise MoEOffloadError(str(err)) from None
    if entry.needs_router_params and not parts.has_weights:
        raise MoEOffloadError(f"--predictor {name} reads the model's router weights; {parts.directory} has "
                              "config.json only")
    if entry.needs_gate_inputs and trace.gate_inputs is None:
        raise MoEOffloadError(f"--predictor {name} needs gate inputs in the trace; record it with "
                              "`moe-offload trace --gate-inputs` (a --synthetic trace has none)")
    params = router_params(parts).to("cpu") if entry.needs_router_params else None
    if entry.needs_fit_trace:
        notes.append(f"predictor {name} is fitted on the replayed trace itself (in-sample)")
    try:   # fail before the runs start
        make_predictor(name, params, fit_trace=trace, replay_trace=trace, model_dir=parts.directory)
    except (ValueError, FileNotFoundError) as err:
        raise MoEOffloadError(f"predictor {name!r}: {err}") from None
    return params


def runnable(parts, setup: SweepSetup, policies: list[str], budgets: list[Budget],
             notes: list[str]) -> list[tuple[str, Budget]]:
    """(policy, budget) pairs to run; a per-layer allocation skips budgets below one slot per layer."""
    layers = len(parts.sites)
    too_small = [b for b in budgets if setup.allocation != "global" and b.slots < layers]
    for b in too_small:
        notes.append(f"{b.label}: {b.slots} slots < {layers} MoE layers, too few for the "
                     f"{setup.allocation!r} allocation; skipped")
    return [(p, b) for p in policies for b in budgets if b not in too_small]


def default_predictor(parts, trace, notes: list[str]) -> str:
    """The runtime's predictor on a GPU (cross_layer) when the trace and the model let it run, else none."""
    name = device_defaults("cuda")["predictor"]
    entry = predictor_entry(name)
    missing = [what for what, lacking in (("gate inputs in the trace", entry.needs_gate_inputs
                                           and trace.gate_inputs is None),
                                          ("the model's router weights", entry.needs_router_params
                                           and not parts.has_weights)) if lacking]
    if not missing:
        return name
    notes.append(f"the runtime's default predictor {name} needs {' and '.join(missing)}; projected without "
                 "prefetch (name one with --predictor, e.g. oracle or oracle@0.8 for bounds)")
    return NO_PREDICTOR


def sweep_cost(parts, setup: SweepSetup):
    """The CostModel of the model's experts on ``setup.hardware`` (``setup.disk_gbps`` replacing its disk)."""
    from ..runtime.cost import CostModel, HardwareProfile

    profile = HardwareProfile.from_yaml(setup.hardware)
    if setup.disk_gbps is not None:
        profile = dataclasses.replace(profile, disk_gbps=setup.disk_gbps)
    return CostModel.for_expert(profile, parts.shape.hidden, parts.shape.intermediate, parts.dtype.itemsize,
                                parts.format.nbytes, parts.format.name)


def simulate_rows(parts, setup: SweepSetup, runs: list[tuple[str, Budget]], notes: list[str], trace,
                  predictors: list[str], ray_address: str | None = None) -> list[dict]:
    """One row per predictor, host budget and run, ``trace`` replayed by the simulator and costed with
    ``setup.hardware`` (a host budget below the experts adds the disk tier); the cells run on a process pool,
    or on Ray at ``ray_address`` ('' a local one)."""
    from .cells import Cell, Replay, run_cells

    params = [predictor_params(replace_predictor(setup, name), trace, parts, notes) for name in predictors]
    router = next((p for p in params if p is not None), None)
    replay = Replay(trace, sweep_cost(parts, setup), parts.plan.bytes_per_expert, router, str(parts.directory))
    grid = [(name, label, policy, budget,
             Cell(policy, budget.slots, setup.allocation, name or NO_PREDICTOR, setup.prefetch_depth,
                  None if host is None else sweep_host_rows(parts.plan, host, label), setup.cpu_experts))
            for name in predictors for label, host in setup.host_budgets for policy, budget in runs]
    try:
        results = run_cells(replay, [cell for *_, cell in grid], ray_address=ray_address, progress=setup.progress,
                            desc="sweep (simulated)")
    except ValueError as err:
        raise MoEOffloadError(f"simulated sweep: {err}") from None
    return [result_row(policy, budget, parts.plan, result.hit_rate, result.bytes_copied_per_token,
                       result.tokens_per_s) | {"predictor": name or NO_PREDICTOR, "host_memory": label,
                                               "disk_bytes_per_token": result.disk_bytes_per_token,
                                               "demand_bytes_per_token": result.demand_bytes_per_token}
            for (name, label, policy, budget, _), result in zip(grid, results)]


def replace_predictor(setup: SweepSetup, name: str | None) -> SweepSetup:
    return dataclasses.replace(setup, predictor=name)


def sweep_host_rows(plan, host: int, label: str) -> int:
    """Host cache rows of a host budget; at least one MoE layer's experts."""
    rows = host // plan.bytes_per_expert
    if rows < plan.experts_per_layer:
        raise MoEOffloadError(f"host memory {label} holds {rows} experts, fewer than one MoE layer's "
                              f"{plan.experts_per_layer}; give more")
    return int(rows)


def engine_rows(parts, setup: SweepSetup, runs: list[tuple[str, Budget]]) -> list[dict]:
    """One row per run, measured by loading the model and generating on ``setup.device``."""
    rows = []
    for policy, budget in tqdm(runs, desc="sweep (engine)", unit="run", disable=not setup.progress):
        hit_rate, bytes_per_token, tokens_per_s = run_engine(setup, policy, budget.slots)
        rows.append(result_row(policy, budget, parts.plan, hit_rate, bytes_per_token, tokens_per_s)
                    | {"predictor": setup.predictor or "default"})
    return rows


def simulate_offline_rows(parts, setup: SweepSetup, offline, runs: list[tuple[str, Budget]], notes: list[str], trace,
                          predictors: list[str], ray_address: str | None = None) -> list[dict]:
    """``simulate_rows`` for offline batches (simulate.offline): one row per predictor, host budget, run and
    batch size of ``offline`` (an OfflineSetup), each with offline tokens/s and its physical bound. A
    synthetic sweep replays a synthetic trace of B sequences per batch size; else ``trace``'s tokens, as B
    streams (a batch size it has too few tokens for is skipped with a note)."""
    from .cells import Cell, Replay, run_jobs
    from .offline import StepModel, batched_trace, host_split, offline_row, offline_trace, steps_for

    cost = sweep_cost(parts, setup)
    step = StepModel.of(parts, cost.profile)
    plan = parts.plan
    kv_per_token = parts.adapter.kv_bytes_per_token(parts.hf_config, parts.dtype.itemsize)
    params = [predictor_params(replace_predictor(setup, name), trace, parts, notes) for name in predictors]
    router = next((p for p in params if p is not None), None)
    traces = {}
    for batch in offline.batches:
        if setup.synthetic_tokens:
            traces[batch] = offline_trace(len(parts.sites), parts.num_experts, parts.hf_config.num_experts_per_tok,
                                          batch, setup.locality)
        elif trace.num_tokens >= batch:
            traces[batch] = batched_trace(trace, batch, min(steps_for(batch), trace.num_tokens // batch))
        else:
            notes.append(f"batch {batch}: the trace has {trace.num_tokens} tokens, fewer than one step; skipped")
    grid, skipped = [], []
    for batch, batched in traces.items():
        replay = Replay(batched, cost, plan.bytes_per_expert, router, str(parts.directory))
        for name in predictors:
            for label, host in setup.host_budgets:
                rows, host_kv, why = host_split(plan, host, batch, kv_per_token, offline)
                if why is not None:
                    skipped.append({"batch": batch, "host_memory": label, "predictor": name or NO_PREDICTOR,
                                    "fits": False, "note": why})
                    notes.append(f"batch {batch}, host memory {label}: {why}; not projected")
                    continue
                for policy, budget in runs:
                    cell = Cell(policy, budget.slots, setup.allocation, name or NO_PREDICTOR, setup.prefetch_depth,
                                rows, setup.cpu_experts)
                    grid.append((batch, name, label, policy, budget, host_kv, rows, replay, cell))
    optimal = {(batch, budget.slots): (replay, Cell("belady", budget.slots, "global", NO_PREDICTOR, 1, None, "never"))
               for batch, *_, budget, _, _, replay, _ in grid}   # the bound's fewest fetches
    jobs = [(replay, cell) for *_, replay, cell in grid] + list(optimal.values())
    try:
        results = run_jobs(jobs, ray_address=ray_address, progress=setup.progress, desc="sweep (offline, simulated)")
    except ValueError as err:
        raise MoEOffloadError(f"simulated offline sweep: {err}") from None
    fewest = dict(zip(optimal, results[len(grid):]))
    out = []
    for (batch, name, label, policy, budget, host_kv, rows, replay, _), result in zip(grid, results):
        row = offline_row(step, offline, batch, result, fewest[batch, budget.slots],
                          replay.trace.num_tokens // batch, cost, setup.cpu_experts)
        out.append(result_row(policy, budget, plan, result.hit_rate, result.bytes_copied_per_token,
                              row["tokens_per_s"])
                   | row | {"predictor": name or NO_PREDICTOR, "host_memory": label, "fits": True,
                            "host_kv_bytes": host_kv, "host_expert_rows": plan.num_experts if rows is None else rows,
                            "disk_bytes_per_token": result.disk_bytes_per_token,
                            "demand_bytes_per_token": result.demand_bytes_per_token})
    return out + skipped
