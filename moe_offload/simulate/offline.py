"""Offline throughput projection: module-based batching at batch size B (``sweep --simulate --batch``,
``plan --batch``).

B = sequences decoded together, S = decode steps replayed, C = context tokens a step attends over,
L = MoE layers, k = experts per token

An offline job decodes B sequences together: each decoder layer's attention runs over all B (in micro-batches
whose KV cache lives in host memory when it does not fit on the device), then each MoE layer runs once over
the B tokens of the step, so every expert the step selects crosses the link (or is read by the CPU) once for
the whole batch. The projection of one decode step:

- routed experts: the simulator replays S steps of B tokens each, every step one router call per layer with
  the token counts per expert (the runtime's own call protocol, cache, hybrid scheduler and prefetcher), on
  a trace of B streams of S consecutive tokens (step s holds token s of every stream: a stream keeps its
  temporal locality from step to step, the B streams of one step are different sequences);
- dense weights: the slower of reading them once (device memory) and their FLOPs for B tokens;
- attention: the KV of B sequences at the mean context C = prompt + new / 2. On the device when B x C
  tokens fit the KV reserve; else in host memory, read by the CPU (the slower of its memory and FLOPs),
  which overlaps with the expert stream on the link, so a step takes the longer of the two;
- step = max(experts, attention on the CPU) + dense (+ attention on the device).

Host memory holds the KV of B sequences at full context (prompt + new) first; the experts get the rest (below
every expert: the disk tier; below one MoE layer's experts: that B does not fit).

The physical bound of a step is the larger of (a) the expert bytes that must arrive: the misses of Belady's
optimal cache with the same slots on the same trace (no policy or prefetch order fetches fewer), each either
copied or run by the CPU (for the step's mean tokens per selected expert), the two working in parallel at
their costed rates, and (b) the step's FLOPs
(experts and dense weights at the device's rate) or reading the dense weights from device memory. Attention and the disk tier are left out of that bound, so
it is optimistic where they dominate; ``bound_kv_tokens_per_s`` adds (c) reading the host KV once per step at
the host's memory rate (it overlaps with the link, so the bound is the largest of the three).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import MoEOffloadError
from ..predictor.synthetic import SyntheticTraceConfig, synthetic_trace
from ..predictor.trace import Trace

DEFAULT_BATCHES = (1, 16, 64, 256, 1024)
MIN_TOKENS = 256   # tokens replayed per batch size at least (B = 1: 256 steps)
MIN_STEPS = 8      # steps replayed per batch size at least


@dataclass(frozen=True)
class OfflineSetup:
    """What every batch size of one projection shares."""

    batches: tuple[int, ...] = DEFAULT_BATCHES
    prompt_tokens: int = 512     # prompt length of every sequence
    new_tokens: int = 256        # tokens generated per sequence

    @property
    def mean_context(self) -> float:
        """Tokens a decode step attends over, averaged over the generation."""
        return self.prompt_tokens + self.new_tokens / 2

    @property
    def max_context(self) -> int:
        return self.prompt_tokens + self.new_tokens


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,16,64' -> (1, 16, 64); a positive integer each."""
    try:
        batches = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise MoEOffloadError(f"cannot read --batch {text!r}; give batch sizes like 1,16,64,256") from None
    if not batches or min(batches) < 1:
        raise MoEOffloadError(f"--batch {text!r} needs positive batch sizes, e.g. 1,16,64,256")
    return batches


def steps_for(batch: int) -> int:
    """Decode steps replayed at batch size ``batch``."""
    return max(MIN_STEPS, math.ceil(MIN_TOKENS / batch))


def batched_trace(trace: Trace, batch: int, steps: int) -> Trace:
    """``trace``'s first batch x steps tokens as B streams of S consecutive tokens, step-major: rows
    [s * B, (s + 1) * B) are step s (token s of each stream), one router call each (one sequence id per step,
    marked as one forward pass, not as single-token decode calls)."""
    need = batch * steps
    if trace.num_tokens < need:
        raise MoEOffloadError(f"batch {batch} x {steps} steps needs {need} tokens of trace, it has "
                              f"{trace.num_tokens}; record a longer trace or use a synthetic one")
    order = (np.arange(batch)[None, :] * steps + np.arange(steps)[:, None]).reshape(-1)   # [S * B]
    gates = None if trace.gate_inputs is None else trace.gate_inputs[order]
    return Trace(trace.expert_ids[order], trace.router_probs[order],
                 np.repeat(np.arange(steps, dtype=np.int32), batch), np.zeros(need, dtype=bool), gates,
                 dict(trace.meta, batch=batch, steps=steps))


def offline_trace(layers: int, experts: int, top_k: int, batch: int, locality: tuple[float, float, float],
                  seed: int = 0) -> Trace:
    """A synthetic batched trace: B sequences of ``steps_for(B)`` decode tokens with ``locality``
    (skew, repeat, cross_layer), step-major (``batched_trace``)."""
    steps = steps_for(batch)
    skew, repeat, cross = locality
    trace = synthetic_trace(SyntheticTraceConfig(tokens=batch * steps, layers=layers, experts=experts, top_k=top_k,
                                                 skew=skew, repeat=repeat, cross_layer=cross,
                                                 tokens_per_sequence=steps, seed=seed))
    return batched_trace(trace, batch, steps)


def host_split(plan, host_memory: int | None, batch: int, kv_bytes_per_token: int,
               setup: OfflineSetup) -> tuple[int | None, int, str | None]:
    """(host expert rows or None: every expert, host KV bytes, why B does not fit or None).

    ``plan``: the model's loading.budget.MemoryPlan. The KV of B sequences at full context is kept in host
    memory when it does not fit the device's KV reserve; the experts get what is left."""
    kv = batch * setup.max_context * kv_bytes_per_token
    host_kv = 0 if kv <= plan.kv_reserve_bytes else kv
    if host_memory is None:
        return None, host_kv, None
    left = host_memory - host_kv
    rows = max(0, left) // plan.bytes_per_expert
    if rows < plan.experts_per_layer:
        return None, host_kv, (f"the KV of {batch} sequences ({host_kv / 2**30:.1f} GiB) leaves room for {rows} "
                               f"experts in host memory, fewer than one layer's {plan.experts_per_layer}")
    return (None if rows >= plan.num_experts else int(rows)), host_kv, None


@dataclass(frozen=True)
class StepModel:
    """The non-expert costs of one decode step and the physical bound (module docstring)."""

    profile: object              # runtime.cost.HardwareProfile
    dense_bytes: int
    dense_flops_per_token: float
    expert_flops_per_token: float    # all the routed experts of one token (k per MoE layer)
    kv_bytes_per_token: int
    attention_flops_per_context: float   # FLOPs per token per context token (all layers)
    kv_reserve_bytes: int
    top_k: int = 1
    experts_per_layer: int = 1

    @classmethod
    def of(cls, parts, profile) -> "StepModel":
        """From a loader.ModelParts (its memory plan and config) and a HardwareProfile."""
        cfg = parts.hf_config
        itemsize = parts.dtype.itemsize
        hidden = parts.shape.hidden
        embeddings = 0 if getattr(cfg, "tie_word_embeddings", False) else cfg.vocab_size * hidden   # a lookup
        dense_params = parts.plan.dense_bytes / itemsize - embeddings
        layers = cfg.num_hidden_layers
        heads = getattr(cfg, "num_attention_heads", 1)
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        return cls(profile, parts.plan.dense_bytes, 2.0 * dense_params,
                   2.0 * 3 * hidden * parts.shape.intermediate * cfg.num_experts_per_tok * len(parts.sites),
                   parts.adapter.kv_bytes_per_token(cfg, itemsize), 4.0 * heads * head_dim * layers,
                   parts.plan.kv_reserve_bytes, cfg.num_experts_per_tok, parts.plan.experts_per_layer)

    def dense_s(self, batch: int) -> float:
        p = self.profile
        return max(self.dense_bytes / (p.gpu_mem_gbps * 1e9), batch * self.dense_flops_per_token / (p.gpu_tflops * 1e12))

    def attention(self, batch: int, context: float) -> tuple[float, str]:
        """(seconds, where): attention of B tokens over ``context`` tokens each, on the device when the KV
        fits the reserve, else on the CPU reading host memory."""
        p = self.profile
        kv = batch * context * self.kv_bytes_per_token
        flops = batch * context * self.attention_flops_per_context
        if kv <= self.kv_reserve_bytes:
            return max(kv / (p.gpu_mem_gbps * 1e9), flops / (p.gpu_tflops * 1e12)), "device"
        return max(kv / (p.cpu_mem_gbps * 1e9), flops / (p.cpu_gflops * 1e9)), "cpu"

    def bound_s(self, batch: int, missing: float, cost, cpu: bool) -> float:
        """Physical bound of one step: ``missing`` experts beyond the slots to copy or (``cpu``) run on the CPU
        in parallel (each with the step's mean tokens per expert), or the step's FLOPs on the device,
        whichever takes longer."""
        tokens = max(1, round(batch * self.top_k / self.experts_per_layer))       # mean tokens per selected expert
        rate = 1.0 / cost.copy_s() + (1.0 / cost.cpu_s(tokens) if cpu else 0.0)  # experts per second
        flops = batch * (self.expert_flops_per_token + self.dense_flops_per_token)
        p = self.profile
        return max(missing / rate, flops / (p.gpu_tflops * 1e12), self.dense_bytes / (p.gpu_mem_gbps * 1e9))


def offline_row(step: StepModel, setup: OfflineSetup, batch: int, result, optimal, steps: int, cost,
                cpu_experts: str) -> dict:
    """One batch size's projection from its simulated replay ``result`` and ``optimal``, the replay of the same
    trace and slots under Belady's policy (SimulationResults of ``steps`` steps)."""
    expert_s = result.seconds / steps
    attention_s, where = step.attention(batch, setup.mean_context)
    dense_s = step.dense_s(batch)
    step_s = (max(expert_s, attention_s) + dense_s) if where == "cpu" else (expert_s + attention_s + dense_s)
    missing = optimal.misses / steps
    bound_s = step.bound_s(batch, missing, cost, cpu_experts != "never")
    kv_read_s = batch * setup.mean_context * step.kv_bytes_per_token / (step.profile.cpu_mem_gbps * 1e9)
    bound_kv_s = max(bound_s, kv_read_s if where == "cpu" else 0.0)
    return {"batch": batch, "tokens_per_s": batch / step_s, "bound_tokens_per_s": batch / bound_s,
            "of_bound": bound_s / step_s, "bound_kv_tokens_per_s": batch / bound_kv_s, "of_bound_kv": bound_kv_s / step_s, "step_s": step_s, "expert_s": expert_s, "attention_s": attention_s,
            "attention_on": where, "dense_s": dense_s, "hit_rate": result.hit_rate,
            "bytes_copied_per_token": result.bytes_copied_per_token, "missing_experts_per_step": missing,
            "steps_replayed": steps}
