"""/metrics: the server's counters and the offload engine's in the Prometheus text format (0.0.4)."""

from __future__ import annotations

from .engine import BatchEngine


def _metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    return lines + [f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                    for labels, value in samples]


def render_metrics(engine: BatchEngine) -> str:
    """Requests by outcome, tokens in and out, queue depth, running sequences, decode steps, and the
    offload engine's cache hit rate, bytes copied to the device and experts run on the CPU."""
    c, stats = engine.counters, engine.model.offload.stats
    lines = _metric("moe_offload_requests_total", "counter",
                    "Requests by outcome (rejected: the queue was full; cancelled: the client went away).",
                    [(f'{{outcome="{k}"}}', v) for k, v in sorted(c.requests.items())])
    lines += _metric("moe_offload_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
                     [("", c.prompt_tokens)])
    lines += _metric("moe_offload_generation_tokens_total", "counter", "Tokens generated.",
                     [("", c.completion_tokens)])
    lines += _metric("moe_offload_queue_depth", "gauge", "Requests waiting to join the batch.",
                     [("", engine.queue_depth)])
    lines += _metric("moe_offload_running_sequences", "gauge", "Sequences in the running batch.",
                     [("", engine.running)])
    lines += _metric("moe_offload_decode_steps_total", "counter", "Batched decode steps.", [("", c.decode_steps)])
    lines += _metric("moe_offload_decode_sequences_total", "counter",
                     "Sum over decode steps of the sequences in the batch (divide by steps: mean batch).",
                     [("", c.decode_rows)])
    lines += _metric("moe_offload_expert_cache_hit_rate", "gauge",
                     "Share of selected experts already on the device.", [("", float(stats.hit_rate))])
    lines += _metric("moe_offload_expert_copied_bytes_total", "counter",
                     "Expert bytes copied to the device (demand, fills, prefetch).",
                     [("", int(stats.bytes_copied.sum()))])
    lines += _metric("moe_offload_cpu_experts_total", "counter", "Expert calls run on the CPU instead of copied.",
                     [("", int(stats.cpu_experts.sum()))])
    return "\n".join(lines) + "\n"
