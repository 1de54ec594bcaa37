"""Plan a machine: the offload configuration the simulator projects fastest for a model, a GPU and host memory.

The search replays one routing trace through the simulator (the runtime's own call protocol) for a coarse grid
(every expert format x prefetch depth 1 and 8, the score cache, the hybrid scheduler), then refines around the
best cell (other cache policies and slot allocations, CPU experts never, the depths beside the best one, a
smaller KV reserve). Each format sizes its own device slots (``gpu_memory`` less the dense weights, the KV
reserve and the workspace) and host cache (``host_memory``: below the experts, the disk tier). The trace is
the model's own (``moe-offload trace --gate-inputs``), replayed with the runtime's predictor, when one is given;
else a synthetic decode trace with the shipped models' locality, replayed with ``oracle@R``: the true next
experts kept at the recall R the shipped models' predictors reach.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from ..errors import MoEOffloadError
from ..loading.config import OffloadConfig
from ..predictor.synthetic import SyntheticTraceConfig, synthetic_trace
from .cells import Cell, Replay, run_jobs
from .simulator import SimulationResult
from .sweep import SYNTHETIC_LOCALITY, SweepSetup, predictor_params, sweep_cost, sweep_host_rows

FORMATS = (None, "int8", "fp8", "int4", "int4-g128")   # None: the checkpoint's dtype
SHIPPED_RECALL = 0.8      # the shipped models' learned predictor reaches 0.84-0.88 at distance 1, the gate 0.73-0.77
COARSE_DEPTHS = (1, 8)
KV_RESERVES = (2048, 1024)   # tokens of KV cache left free on the device: the default, then half (refinement)
PREFILL_TOKENS = 512
PLANNED_FIELDS = ("gpu_memory", "host_memory", "expert_dtype", "cache_policy", "slot_allocation", "cpu_experts",
                  "predictor", "prefetch_depth", "kv_reserve_tokens", "hardware")


@dataclass(frozen=True)
class PlanRequest:
    model: str
    gpu_memory: int
    host_memory: int | None = None   # None: every expert in host memory
    hardware: str = "rtx4090-pcie4"
    disk_gbps: float | None = None
    trace: str | None = None         # the model's own routing trace (with gate inputs): its predictor replays it
    predictor: str = "cross_layer"   # the runtime predictor replayed on ``trace``
    tokens: int = 200                # synthetic decode tokens of the refinement's replays (the coarse grid's: a third)
    workers: int | None = None
    ray_address: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class Candidate:
    """One configuration and what the simulator projects for it."""

    expert_dtype: str | None
    slots: int
    kv_reserve_tokens: int
    cell: Cell
    result: SimulationResult
    prefill_tokens_per_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.result.tokens_per_s

    def row(self) -> dict:
        return {"expert_dtype": self.expert_dtype or "checkpoint", "slots": self.slots,
                "kv_reserve_tokens": self.kv_reserve_tokens, "cache_policy": self.cell.policy,
                "slot_allocation": self.cell.allocation, "cpu_experts": self.cell.cpu_experts,
                "predictor": self.cell.predictor, "prefetch_depth": self.cell.prefetch_depth,
                "decode_tokens_per_s": self.decode_tokens_per_s, "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "hit_rate": self.result.hit_rate, "bytes_copied_per_token": self.result.bytes_copied_per_token}


@dataclass(frozen=True)
class PlanResult:
    candidates: list[Candidate]      # best first
    predictor: str                   # what the replays prefetched with
    runtime_predictor: str           # what the runtime will run
    notes: list[str]

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def summary(self) -> str:
        """The best configuration and its projection, in a sentence."""
        best = self.best
        cell = best.cell
        return (f"{best.row()['expert_dtype']} experts, {best.slots} slots (KV reserve {best.kv_reserve_tokens} "
                f"tokens), {cell.policy} cache, {cell.allocation} slots, CPU experts {cell.cpu_experts}, "
                f"prefetch depth {cell.prefetch_depth}: projected decode {best.decode_tokens_per_s:.2f} tokens/s, "
                f"prefill {best.prefill_tokens_per_s:.1f} tokens/s, hit rate {best.result.hit_rate:.1%}, "
                f"{best.result.bytes_copied_per_token / 1e6:.1f} MB copied per token")

    def fields(self, request: PlanRequest) -> dict:
        """The OffloadConfig fields the plan sets (what its YAML holds)."""
        return {k: v for k, v in self.config(request).to_dict().items() if k in PLANNED_FIELDS and v is not None}

    def write(self, path: str | Path, request: PlanRequest, command: str) -> Path:
        """The plan as an OffloadConfig YAML (``run --config``), headed by the ``command`` that made it."""
        path = Path(path)
        path.write_text(f"# {command}\n# projected decode {self.best.decode_tokens_per_s:.2f} tokens/s "
                        f"(replayed with {self.predictor})\n" + yaml.safe_dump(self.fields(request), sort_keys=False))
        return path

    def config(self, request: PlanRequest) -> OffloadConfig:
        """The best candidate as an OffloadConfig for ``run --config``."""
        best = self.best
        return OffloadConfig().replace(
            gpu_memory=request.gpu_memory, host_memory=request.host_memory, expert_dtype=best.expert_dtype,
            cache_policy=best.cell.policy, slot_allocation=best.cell.allocation, cpu_experts=best.cell.cpu_experts,
            predictor=self.runtime_predictor, prefetch_depth=best.cell.prefetch_depth,
            kv_reserve_tokens=best.kv_reserve_tokens, hardware=request.hardware)


@dataclass(frozen=True)
class _Format:
    """What one expert format and KV reserve give: the replay (costs, bytes) and the slot and host-row counts."""

    expert_dtype: str | None
    kv_reserve_tokens: int
    replay: Replay
    slots: int
    host_rows: int | None
    coarse: Replay                   # the coarse grid's: a shorter synthetic trace (the given trace as it is)


def plan(request: PlanRequest) -> PlanResult:
    """Search the configurations (see the module docstring); candidates sorted by decode tokens/s."""
    from ..loading.parts import has_weights

    notes: list[str] = []
    trace, predictor, runtime_predictor = _trace(request, notes)
    weights = has_weights(request.model)
    formats, shared = {}, {}
    for dtype in FORMATS:
        for kv in KV_RESERVES:
            shaped = _format(request, dtype, kv, trace, predictor, weights, notes, shared)
            if shaped is not None:
                formats[dtype, kv] = shaped
    if not formats:
        raise MoEOffloadError(f"no expert format of {request.model} fits in {request.gpu_memory / 2**30:.2f} GiB "
                              f"of GPU memory ({'; '.join(notes)}); give more --gpu-memory")
    coarse = [(replace(f, replay=f.coarse), Cell("score", f.slots, "global", predictor, depth, f.host_rows, "auto"))
              for (dtype, kv), f in formats.items() if kv == KV_RESERVES[0] for depth in COARSE_DEPTHS]
    best = _evaluate(request, coarse)[0]
    shaped = formats[best.expert_dtype, best.kv_reserve_tokens]
    refine = [(shaped, replace(best.cell, **change)) for change in [{}, *_refinements(best.cell)]]
    refine += [(f, replace(best.cell, slots=f.slots)) for (dtype, kv), f in formats.items()
               if dtype == best.expert_dtype and kv != best.kv_reserve_tokens]
    candidates = _evaluate(request, refine)
    top = [_with_prefill(formats[c.expert_dtype, c.kv_reserve_tokens], c) for c in candidates]
    return PlanResult(top, predictor, runtime_predictor, notes)


def _refinements(cell: Cell) -> list[dict]:
    depths = sorted({max(1, cell.prefetch_depth // 2), cell.prefetch_depth + 4} - {cell.prefetch_depth})
    return [{"policy": "lru"}, {"policy": "arc"}, {"allocation": "uniform"}, {"cpu_experts": "never"},
            *({"prefetch_depth": d} for d in depths)]


def _evaluate(request: PlanRequest, jobs: list[tuple[_Format, Cell]]) -> list[Candidate]:
    results = run_jobs([(f.replay, cell) for f, cell in jobs], request.workers, request.ray_address,
                       request.progress, desc="plan")
    found = [Candidate(f.expert_dtype, f.slots, f.kv_reserve_tokens, cell, result)
             for (f, cell), result in zip(jobs, results)]
    return sorted(found, key=lambda c: -c.decode_tokens_per_s)


def _with_prefill(shaped: _Format, candidate: Candidate) -> Candidate:
    """``candidate`` with its projected prefill tokens/s: one prompt of PREFILL_TOKENS tokens."""
    from .cells import run_cell

    layout = shaped.replay.trace
    prompt = synthetic_trace(SyntheticTraceConfig(tokens=PREFILL_TOKENS, layers=layout.num_layers,
                                                  experts=layout.num_experts, top_k=layout.top_k,
                                                  skew=SYNTHETIC_LOCALITY[0], repeat=SYNTHETIC_LOCALITY[1],
                                                  prompt_tokens=PREFILL_TOKENS, seed=1))
    cell = replace(candidate.cell, predictor="none")   # one call per layer: nothing to prefetch within it
    result = run_cell(replace(shaped.replay, trace=prompt), cell)
    return replace(candidate, prefill_tokens_per_s=result.tokens_per_s)


def _trace(request: PlanRequest, notes: list[str]):
    """(the trace, the predictor its replays prefetch with, the runtime predictor the plan names)."""
    from ..predictor import Trace, TraceFormatError

    if request.trace:
        try:
            trace = Trace.load(request.trace)
        except TraceFormatError as err:
            raise MoEOffloadError(str(err)) from None
        if trace.gate_inputs is not None:
            notes.append(f"replayed the model's own trace {request.trace} with its predictor {request.predictor}")
            return trace, request.predictor, request.predictor
        notes.append(f"trace {request.trace} has no gate inputs: the predictor cannot replay it; used oracle@"
                     f"{SHIPPED_RECALL:g} on it (record it with `moe-offload trace --gate-inputs`)")
        return trace, f"oracle@{SHIPPED_RECALL:g}", request.predictor
    notes.append(f"no trace of the model: replayed a synthetic decode trace of {request.tokens} tokens with the "
                 f"shipped models' locality, prefetching with oracle@{SHIPPED_RECALL:g} (the recall their "
                 f"predictors reach); record one with `moe-offload trace --gate-inputs` and pass --trace")
    return None, f"oracle@{SHIPPED_RECALL:g}", request.predictor


def _format(request: PlanRequest, dtype: str | None, kv: int, trace, predictor: str, weights: bool,
            notes: list[str], shared: dict) -> _Format | None:
    """The replay and slot counts of expert format ``dtype`` with a KV reserve of ``kv`` tokens, or None when
    the dense weights and one layer's experts do not fit. ``shared``: the skeleton's parts, built once, and the
    predictor's router tensors, read from them."""
    from ..loading.parts import ModelParts

    cfg = OffloadConfig(device="cpu", gpu_memory=request.gpu_memory, expert_dtype=dtype, kv_reserve_tokens=kv)
    try:
        if "parts" not in shared:    # the skeleton, built once: each format and reserve replans it
            shared["parts"] = ModelParts(request.model, OffloadConfig(device="cpu"), weights=weights)
        parts = shared["parts"].replanned(cfg)
    except MoEOffloadError as err:
        if kv == KV_RESERVES[0]:
            notes.append(f"{dtype or 'checkpoint format'}: {err}")
        return None
    synthetic = trace is None
    if synthetic:
        trace = _synthetic(parts, request.tokens)
    setup = SweepSetup(request.model, "cpu", None, "global", [], 0, False, predictor=predictor,
                       hardware=request.hardware, disk_gbps=request.disk_gbps)
    if "params" not in shared:
        shared["params"] = predictor_params(setup, trace, parts, notes)
    replay = Replay(trace, sweep_cost(parts, setup), parts.plan.bytes_per_expert, shared["params"],
                    str(parts.directory))
    host_rows = None
    if request.host_memory is not None and request.host_memory < parts.plan.bytes_per_expert * parts.plan.num_experts:
        host_rows = sweep_host_rows(parts.plan, request.host_memory, f"{request.host_memory / 2**30:.0f}GiB")
    coarse = replace(replay, trace=_synthetic(parts, max(1, request.tokens // 3))) if synthetic else replay
    return _Format(dtype, kv, replay, parts.plan.slots, host_rows, coarse)


def _synthetic(parts, tokens: int):
    """A synthetic decode trace shaped like the model with the shipped models' locality."""
    skew, repeat, cross = SYNTHETIC_LOCALITY
    return synthetic_trace(SyntheticTraceConfig(tokens=tokens, layers=len(parts.sites), experts=parts.num_experts,
                                                top_k=parts.hf_config.num_experts_per_tok, skew=skew, repeat=repeat,
                                                cross_layer=cross))


@dataclass(frozen=True)
class OfflineChoice:
    """The best expert format at one batch size, and every format's projection there."""

    batch: int
    best: dict | None                # the fastest format's row (simulate.offline), None when no format fits
    rows: list[dict]                 # every format's row at this batch size (fits False: why not)


def plan_offline(request: PlanRequest, offline, cell: Cell | None = None,
                 formats: tuple = FORMATS) -> list[OfflineChoice]:
    """Offline tokens/s per batch size of ``offline`` (a simulate.offline.OfflineSetup) for every expert format
    that fits, each with its own slots and host rows (the KV of the batch counted against
    ``request.host_memory``), replayed with ``cell``'s policy, prefetch and CPU-expert mode (default: the score
    cache, the synthetic trace's prefetcher, the hybrid scheduler)."""
    from ..loading.parts import ModelParts, has_weights
    from .sweep import Budget, simulate_offline_rows

    notes: list[str] = []
    cell = cell or Cell("score", 0, "global", f"oracle@{SHIPPED_RECALL:g}", 1, None, "auto")
    base = ModelParts(request.model, OffloadConfig(device="cpu"), weights=has_weights(request.model))
    host = request.host_memory
    label = "all" if host is None else f"{host / 2**30:g}GiB"
    rows: list[dict] = []
    for dtype in formats:
        try:
            parts = base.replanned(OffloadConfig(device="cpu", gpu_memory=request.gpu_memory, expert_dtype=dtype))
        except MoEOffloadError as err:
            notes.append(f"{dtype or 'checkpoint format'}: {err}")
            continue
        setup = SweepSetup(request.model, "cpu", None, cell.allocation, [], 0, request.progress, cell.cpu_experts,
                           cell.predictor, synthetic_tokens=1, hardware=request.hardware,
                           prefetch_depth=cell.prefetch_depth, host_budgets=((label, host),),
                           disk_gbps=request.disk_gbps)
        found = simulate_offline_rows(parts, setup, offline, [(cell.policy, Budget("plan", parts.plan.slots))], notes,
                                      _synthetic(parts, 64), [cell.predictor], request.ray_address)
        rows += [r | {"expert_dtype": dtype or "checkpoint"} for r in found]
    choices = []
    for batch in offline.batches:
        mine = [r for r in rows if r["batch"] == batch]
        fitting = [r for r in mine if r["fits"]]
        choices.append(OfflineChoice(batch, max(fitting, key=lambda r: r["tokens_per_s"]) if fitting else None, mine))
    return choices
