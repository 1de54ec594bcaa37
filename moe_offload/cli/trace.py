"""`moe-offload trace`: record a routing trace (experts, router scores, optional gate inputs) to .npz.

    moe-offload trace --model tiny-mixtral --stdlib-heldout 40 --max-new-tokens 32 --out trace.npz --gate-inputs
    moe-offload trace --model DIR --prompts prompts.jsonl --max-new-tokens 64 --out trace.npz
"""

from __future__ import annotations

import argparse

from .argtypes import positive_int
from .common import add_model_args, add_prompt_args, offload_config, prompts_from_args, record_prompts


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``trace`` subcommand."""
    p = subparsers.add_parser("trace", help="record which experts each token picks (a routing trace, .npz)")
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--gate-inputs", action="store_true",
                   help="also store each MoE layer's router input (needed to fit and evaluate gate predictors)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..loading.loader import from_pretrained

    prompts = prompts_from_args(args)   # a bad prompts file fails before the model loads
    model = from_pretrained(args.model, offload_config(args))
    trace = record_prompts(args, model, prompts, gate_inputs=args.gate_inputs)
    path = trace.save(args.out)
    print(f"[moe-offload] traced {len(prompts)} prompts, {trace.num_tokens} tokens "
          f"({int(trace.decode.sum())} generated), {trace.num_layers} MoE layers x {trace.num_experts} experts, "
          f"top-{trace.top_k}{', with gate inputs' if trace.gate_inputs is not None else ''} -> {path}")
    return 0
