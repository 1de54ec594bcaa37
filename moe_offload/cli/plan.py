"""`moe-offload plan`: the offload configuration the simulator projects fastest for a model on a machine.

    moe-offload plan --model mixtral-8x7b --gpu-memory 24GiB --host-memory 64GiB --hardware rtx4090-pcie4
    moe-offload plan --model /path/to/ckpt --gpu-memory 12GiB --trace trace.npz --out plan.yaml --ray

Searches expert format, device slots (the KV reserve they leave), slot allocation, cache policy, CPU experts
and prefetch depth with the simulator (moe_offload.simulate.plan), prints the best configuration and the
runner-up rows, and writes the best as an OffloadConfig YAML for ``run --config`` and ``serve --config``.
"""

from __future__ import annotations

import argparse

from ..loading.config import parse_bytes
from ..simulate.plan import PlanRequest, plan
from .argtypes import positive_int

SHOWN = 8   # rows printed


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``plan`` subcommand."""
    p = subparsers.add_parser("plan", help="search the fastest offload configuration for a model on a machine")
    p.add_argument("--model", required=True, help="checkpoint directory, shipped model name, a directory with "
                                                  "config.json only, or a shape preset (mixtral-8x7b, ...)")
    p.add_argument("--gpu-memory", required=True, help="GPU memory to use, e.g. 24GiB")
    p.add_argument("--host-memory", help="host memory for experts, e.g. 64GiB (default: every expert)")
    p.add_argument("--hardware", default="rtx4090-pcie4", help="hardware profile name or YAML (default rtx4090-pcie4)")
    p.add_argument("--disk-gbps", type=float, help="the disk's read GB/s (default: the profile's)")
    p.add_argument("--trace", help="the model's routing trace with gate inputs (moe-offload trace --gate-inputs): "
                                   "replayed with the runtime's predictor; default a synthetic trace and oracle@R")
    p.add_argument("--predictor", default="cross_layer", help="the runtime predictor (default cross_layer)")
    p.add_argument("--tokens", type=positive_int, default=200, help="synthetic decode tokens per replay of the refinement (200; the coarse grid's a third)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the cells as Ray tasks (a local Ray, or the cluster at ADDRESS); default: a process "
                        "pool over this machine's cores")
    p.add_argument("--out", default="plan.yaml", help="the OffloadConfig YAML written (default plan.yaml)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    request = PlanRequest(args.model, parse_bytes(args.gpu_memory),
                          parse_bytes(args.host_memory) if args.host_memory else None, args.hardware,
                          args.disk_gbps, args.trace, args.predictor, args.tokens, ray_address=args.ray)
    result = plan(request)
    print_rows([c.row() for c in result.candidates[:SHOWN]])
    print(f"[moe-offload] best: {result.summary()}")
    for note in result.notes:
        print(f"[moe-offload] {note}")
    command = (f"moe-offload plan --model {args.model} --gpu-memory {args.gpu_memory}"
               + (f" --host-memory {args.host_memory}" if args.host_memory else "") + f" --hardware {args.hardware}")
    out = result.write(args.out, request, command)
    print(f"[moe-offload] wrote {out} (moe-offload run --config {out})")
    return 0


def print_rows(rows: list[dict]) -> None:
    print(f"{'experts':>10} {'slots':>6} {'KV':>5} {'policy':>7} {'alloc':>8} {'cpu':>6} {'predictor':>11} "
          f"{'depth':>5} {'decode t/s':>10} {'prefill t/s':>11} {'hit rate':>8} {'MB/token':>9}")
    for r in rows:
        print(f"{r['expert_dtype']:>10} {r['slots']:>6} {r['kv_reserve_tokens']:>5} {r['cache_policy']:>7} "
              f"{r['slot_allocation']:>8} {r['cpu_experts']:>6} {r['predictor']:>11} {r['prefetch_depth']:>5} "
              f"{r['decode_tokens_per_s']:>10.2f} {r['prefill_tokens_per_s']:>11.1f} {r['hit_rate']:>8.1%} "
              f"{r['bytes_copied_per_token'] / 1e6:>9.1f}")
