"""`moe-offload plan`: the offload configuration the simulator projects fastest for a model on a machine.

    moe-offload plan --model mixtral-8x7b --gpu-memory 24GiB --host-memory 64GiB --hardware rtx4090-pcie4
    moe-offload plan --model /path/to/ckpt --gpu-memory 12GiB --trace trace.npz --out plan.yaml --ray
    moe-offload plan --model mixtral-8x7b --gpu-memory 24GiB --host-memory 64GiB --batch 1,16,64,256,1024

Searches expert format, device slots (the KV reserve they leave), slot allocation, cache policy, CPU experts
and prefetch depth with the simulator (moe_offload.simulate.plan), prints the best configuration and the
runner-up rows, and writes the best as an OffloadConfig YAML for ``run --config`` and ``serve --config``.
With --batch it also projects offline throughput (``moe-offload batch``: B sequences decoded together, their KV
in host memory counted against --host-memory) per batch size and expert format, against the physical bound
(moe_offload.simulate.offline), and prints the best format for each batch size.
"""

from __future__ import annotations

import argparse

from dataclasses import replace

from ..loading.config import parse_bytes
from ..simulate.offline import OfflineSetup, parse_batches
from ..simulate.plan import PlanRequest, plan, plan_offline
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
    p.add_argument("--batch", metavar="B[,B2,...]",
                   help="also project offline tokens/s at these batch sizes (module-based batching), per expert format")
    p.add_argument("--prompt-tokens", type=positive_int, default=512,
                   help="with --batch: prompt tokens per sequence (512)")
    p.add_argument("--new-tokens", type=positive_int, default=256,
                   help="with --batch: tokens generated per sequence (256)")
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
    if args.batch:
        offline = OfflineSetup(parse_batches(args.batch), args.prompt_tokens, args.new_tokens)
        best = result.best.cell
        print_offline(plan_offline(request, offline, replace(best, predictor=result.predictor)), offline)
    return 0


def print_offline(choices, offline) -> None:
    """One line per batch size: the fastest expert format there, its tokens/s and the physical bounds."""
    print(f"[moe-offload] offline batches ({offline.prompt_tokens} prompt + {offline.new_tokens} new tokens per "
          "sequence; bound: experts over the link or FLOPs, +KV: also reading the host KV)")
    print(f"{'batch':>6} {'experts':>10} {'tokens/s':>10} {'bound':>10} {'of bound':>8} {'+KV bound':>10} "
          f"{'of +KV':>7} {'attention':>9} {'host KV GiB':>11}")
    for choice in choices:
        r = choice.best
        if r is None:
            print(f"{choice.batch:>6}  does not fit: {choice.rows[0]['note'] if choice.rows else 'no format fits'}")
            continue
        print(f"{choice.batch:>6} {r['expert_dtype']:>10} {r['tokens_per_s']:>10.1f} {r['bound_tokens_per_s']:>10.1f} "
              f"{r['of_bound']:>8.0%} {r['bound_kv_tokens_per_s']:>10.1f} {r['of_bound_kv']:>7.0%} "
              f"{r['attention_on']:>9} {r['host_kv_bytes'] / 2**30:>11.1f}")


def print_rows(rows: list[dict]) -> None:
    print(f"{'experts':>10} {'slots':>6} {'KV':>5} {'policy':>7} {'alloc':>8} {'cpu':>6} {'predictor':>11} "
          f"{'depth':>5} {'decode t/s':>10} {'prefill t/s':>11} {'hit rate':>8} {'MB/token':>9}")
    for r in rows:
        print(f"{r['expert_dtype']:>10} {r['slots']:>6} {r['kv_reserve_tokens']:>5} {r['cache_policy']:>7} "
              f"{r['slot_allocation']:>8} {r['cpu_experts']:>6} {r['predictor']:>11} {r['prefetch_depth']:>5} "
              f"{r['decode_tokens_per_s']:>10.2f} {r['prefill_tokens_per_s']:>11.1f} {r['hit_rate']:>8.1%} "
              f"{r['bytes_copied_per_token'] / 1e6:>9.1f}")
