"""moe-offload command line: run, info, calibrate, trace, fit-predictor, sweep."""

from __future__ import annotations

import argparse
import sys

import torch

from . import fit_predictor_cli, sweep, trace_cli
from .argtypes import Parser, non_negative_float, positive_int
from .config import OffloadConfig
from .errors import MoEOffloadError

DEFAULT_MODEL = "tiny-mixtral"
DEFAULT_PROMPT = "def fibonacci(n):\n"


def add_budget_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--gpu-memory", help="device memory the model may use, e.g. 6GiB, 500MB")
    group.add_argument("--expert-slots", type=positive_int, help="expert slots in the device cache")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory or shipped model name (default {DEFAULT_MODEL})")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", help="float32, float16, bfloat16 (default: the checkpoint's)")
    p.add_argument("--config", help="OffloadConfig YAML; flags override it")
    add_budget_args(p)


def offload_config(args: argparse.Namespace, **extra) -> OffloadConfig:
    cfg = OffloadConfig.from_yaml(args.config) if getattr(args, "config", None) else OffloadConfig()
    fields = {"device": args.device, "dtype": args.dtype, "gpu_memory": args.gpu_memory,
              "expert_slots": args.expert_slots} | extra
    return cfg.replace(**{k: v for k, v in fields.items() if v is not None})


def cmd_run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .generation import TimedStreamer
    from .loader import from_pretrained

    cfg = offload_config(args, cache_policy=args.cache_policy)
    model = from_pretrained(args.model, cfg)
    directory = model.config._name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
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
          f"{model.offload.plan.slots}/{model.offload.plan.num_experts} experts on {cfg.device}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .loader import ModelParts

    cfg = offload_config(args)
    parts = ModelParts(args.model, cfg)
    plan = parts.plan
    from .budget import format_bytes

    def gib(n: int) -> str:
        return f"{format_bytes(n)} ({n:,} bytes)"

    rows = [
        ("model", f"{parts.directory} ({parts.hf_config.model_type}, {parts.dtype})"),
        ("dense bytes", gib(plan.dense_bytes)),
        ("expert bytes", gib(plan.expert_bytes)),
        ("bytes per expert", gib(plan.bytes_per_expert)),
        ("experts", f"{plan.num_experts} ({plan.num_moe_layers} MoE layers x {plan.experts_per_layer})"),
        ("KV reserve", f"{gib(plan.kv_reserve_bytes)} for {cfg.kv_reserve_tokens} tokens"),
        ("budget", gib(plan.budget_bytes) if plan.budget_bytes else
         f"{cfg.expert_slots} expert slots" if cfg.expert_slots else "none (every expert gets a slot)"),
        ("slots", f"{plan.slots} ({plan.slots / plan.num_experts:.1%} of experts)"),
        ("one expert per MoE layer", "yes" if plan.one_per_layer else
         f"no: {plan.slots} slots for {plan.num_moe_layers} MoE layers (layers share slots)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Time copies, device and CPU expert compute for the model's expert shape; save a profile."""
    from .calibrate import measure_profile
    from .cost import CostModel, user_profile_dir
    from .cpu_kernels import CpuRunner
    from .loader import ModelParts
    from .transfer.pinning import pinned_empty

    cfg = offload_config(args, expert_slots=1)
    parts = ModelParts(args.model, cfg)
    device, numel = cfg.torch_device, parts.shape.numel
    if cfg.on_cuda:
        host, _ = pinned_empty((numel,), parts.dtype)
    else:
        host = torch.empty(numel, dtype=parts.dtype)
    host.copy_(torch.randn(numel) * 0.02)
    slot = torch.empty(numel, dtype=parts.dtype, device=device)
    runner = CpuRunner(num_threads=args.cpu_threads)
    runner.warmup(dtypes=[str(parts.dtype).removeprefix("torch.")], acts=[parts.hf_config.hidden_act])
    profile = measure_profile(host, slot, parts.shape, runner, name=args.name, repeats=args.repeats)
    out = args.out or user_profile_dir() / f"{args.name}.yaml"
    profile.to_yaml(out)
    costs = CostModel.for_expert(profile, parts.shape.hidden, parts.shape.intermediate, parts.dtype.itemsize)
    print(f"copy {profile.h2d_gbps:.2f} GB/s, device {profile.gpu_mem_gbps:.1f} GB/s / "
          f"{profile.gpu_tflops:.3f} TFLOP/s, CPU {profile.cpu_mem_gbps:.1f} GB/s / {profile.cpu_gflops:.1f} GFLOP/s")
    for tokens in (1, 8, 64):
        print(f"  {tokens:>3} tokens: copy {costs.copy_s() * 1e3:.3f} ms + device {costs.gpu_s(tokens) * 1e3:.3f} ms"
              f" vs CPU {costs.cpu_s(tokens) * 1e3:.3f} ms")
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moe-offload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate text, streaming it, then print speed and cache stats")
    run.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    add_model_args(run)
    run.add_argument("--max-new-tokens", type=positive_int, default=64)
    run.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    run.add_argument("--cache-policy", help="expert cache policy")
    run.set_defaults(func=cmd_run)
    info = sub.add_parser("info", help="sizes of a checkpoint and what a memory budget holds")
    add_model_args(info)
    info.set_defaults(func=cmd_info)
    cal = sub.add_parser("calibrate", help="measure copy, device and CPU expert costs; write a hardware profile")
    cal.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint whose expert shape is measured")
    cal.add_argument("--device", help="cuda, cuda:N or cpu")
    cal.add_argument("--dtype", help="expert dtype (default: the checkpoint's)")
    cal.add_argument("--name", default="local",
                     help="profile name: written to $XDG_CONFIG_HOME/moe-offload/hardware/NAME.yaml "
                          "(~/.config/... by default, never into the installed package), where "
                          "--hardware NAME / hardware: NAME finds it before the shipped profiles")
    cal.add_argument("--out", help="YAML path to write instead (use it with --hardware PATH)")
    cal.add_argument("--cpu-threads", type=positive_int)
    cal.add_argument("--repeats", type=positive_int, default=5)
    cal.set_defaults(func=cmd_calibrate, config=None, gpu_memory=None, expert_slots=None)
    trace_cli.add_parser(sub)
    fit_predictor_cli.add_parser(sub)
    sweep.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except MoEOffloadError as err:
        print(f"moe-offload: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
