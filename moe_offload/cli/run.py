"""`moe-offload run`: generate from a prompt, streaming the text, then print speed and cache stats."""

from __future__ import annotations

import argparse

import torch

from ..errors import MoEOffloadError
from .argtypes import non_negative_float, positive_int
from .common import add_model_args, add_plan_arg, offload_config

DEFAULT_PROMPT = "def fibonacci(n):\n"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``run`` subcommand."""
    p = subparsers.add_parser("run", help="generate text, streaming it, then print speed and cache stats")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    add_model_args(p)
    add_plan_arg(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--cache-policy", help="expert cache policy")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..loading.loader import from_pretrained
    from ..loading.tokenizer import load_tokenizer
    from .streaming import TimedStreamer

    cfg = offload_config(args, cache_policy=args.cache_policy)
    model = from_pretrained(args.model, cfg)
    directory = model.config._name_or_path
    try:
        tokenizer = load_tokenizer(directory)
    except (OSError, ValueError):
        raise MoEOffloadError(f"{directory} has no tokenizer files; `run` needs them (tokenizer.json etc.)") from None
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    streamer = TimedStreamer(tokenizer)
    print(args.prompt, end="", flush=True)
    generate = dict(max_new_tokens=args.max_new_tokens, streamer=streamer,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if args.temperature > 0:
        generate |= dict(do_sample=True, temperature=args.temperature, top_p=0.95)
    else:
        generate |= dict(do_sample=False)
    with torch.inference_mode():
        model.generate(**inputs, **generate)
    t, stats = streamer.timing(), model.offload.stats
    print(f"[moe-offload] prefill {t.prefill_tokens_per_s:.1f} tok/s ({t.prompt_tokens} tokens), "
          f"decode {t.decode_tokens_per_s:.1f} tok/s ({t.new_tokens} tokens), "
          f"hit rate {stats.hit_rate:.1%}, {stats.bytes_copied.sum() / 1e9:.3f} GB copied, "
          f"{model.offload.plan.slots}/{model.offload.plan.num_experts} experts on {cfg.device}"
          + (f", {stats.disk_reads.sum() * stats.bytes_per_expert / 1e9:.3f} GB read from disk"
             if model.offload.plan.disk_tier else ""))
    return 0
