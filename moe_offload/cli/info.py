"""`moe-offload info`: sizes of a checkpoint (or of a config.json alone) and what a memory budget holds."""

from __future__ import annotations

import argparse

from .common import add_model_args, offload_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``info`` subcommand."""
    p = subparsers.add_parser("info", help="sizes of a checkpoint and what a memory budget holds")
    add_model_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..loading.parts import ModelParts, has_weights

    cfg = offload_config(args)
    parts = ModelParts(args.model, cfg, weights=has_weights(args.model))
    plan = parts.plan
    from ..loading.budget import format_bytes

    def gib(n: int) -> str:
        return f"{format_bytes(n)} ({n:,} bytes)"

    rows = [
        ("model", f"{parts.directory} ({parts.hf_config.model_type}, {parts.dtype})"),
        ("weights", "checked" if parts.has_weights else "none: config.json only (sizes from the config)"),
        ("checkpoint format", parts.describe_checkpoint()),
        ("expert format", _expert_format(parts)),
        ("dense bytes", gib(plan.dense_bytes)),
        ("expert bytes", gib(plan.expert_bytes)),
        ("bytes per expert", gib(plan.bytes_per_expert) + (" (scales included)" if parts.format.packed else "")),
        ("experts", f"{plan.num_experts} ({plan.num_moe_layers} MoE layers x {plan.experts_per_layer})"),
        ("KV reserve", f"{gib(plan.kv_reserve_bytes)} for {cfg.kv_reserve_tokens} tokens"),
        ("budget", gib(plan.budget_bytes) if plan.budget_bytes else
         f"{cfg.expert_slots} expert slots" if cfg.expert_slots else "none (every expert gets a slot)"),
        ("slots", f"{plan.slots} ({plan.slots / plan.num_experts:.1%} of experts)"),
        ("host cache", f"{plan.host_rows} experts ({gib(plan.host_bytes)}{', page-locked' if cfg.on_cuda else ''}), "
         f"{cfg.host_policy} policy"
         if plan.disk_tier else f"every expert ({gib(plan.host_bytes)})"),
        ("disk", f"all {plan.num_experts} experts, read on demand and ahead into the host cache" if plan.disk_tier
         else "not used (every expert in host memory)"),
        ("one expert per MoE layer", "yes" if plan.one_per_layer else
         f"no: {plan.slots} slots for {plan.num_moe_layers} MoE layers (layers share slots)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _expert_format(parts) -> str:
    """The routed experts' stored format, and its size against the compute dtype's."""
    fmt = parts.format
    if not fmt.packed:
        return fmt.name
    from ..loading.int4_checkpoint import Int4Checkpoint

    plain = parts.shape.numel * parts.dtype.itemsize
    quantization = parts.quantization
    kept = isinstance(quantization, Int4Checkpoint) and fmt.group and quantization.fits(fmt.group)
    origin = "; the checkpoint's int4 weights repacked, not re-quantized" if kept else ""
    return f"{fmt.describe()} ({fmt.nbytes / plain:.1%} of {str(parts.dtype).removeprefix('torch.')}; computed in it{origin})"
