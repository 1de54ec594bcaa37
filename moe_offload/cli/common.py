"""Arguments and helpers every command shares: the model and budget flags, the config they build,
prompt sources, the tokenizer beside a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..corpus import PROMPT_LINES, read_prompts, stdlib_prompts
from ..errors import MoEOffloadError
from ..loading.config import OffloadConfig, parse_bytes
from .argtypes import positive_int

DEFAULT_MODEL = "tiny-mixtral"


def add_budget_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--gpu-memory", help="device memory the model may use, e.g. 6GiB, 500MB")
    group.add_argument("--expert-slots", type=positive_int, help="expert slots in the device cache")
    p.add_argument("--host-memory", help="page-locked host memory for experts, e.g. 16GiB (default: all of them); "
                                         "below that the rest stay on disk, read on demand and ahead")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory or shipped model name (default {DEFAULT_MODEL})")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", help="float32, float16, bfloat16 (default: the checkpoint's)")
    p.add_argument("--expert-dtype", help="stored format of the routed experts: int8, int4 (groups of 64), int4-g32, "
                                          "int4-g128, fp8 or a float dtype (default: --dtype, or the int4 "
                                          "checkpoint's own groups); quantized once, then cached")
    p.add_argument("--config", help="OffloadConfig YAML; flags override it")
    add_budget_args(p)


def add_plan_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", nargs="?", const="", metavar="PROFILE",
                   help="run with what `moe-offload plan` picks for this model and memory on this machine's "
                        "calibrated profile (or the named PROFILE / YAML): searched once, then read from the plans "
                        "kept beside the profile (a changed profile or checkpoint plans again); flags override it")


def offload_config(args: argparse.Namespace, **extra) -> OffloadConfig:
    cfg = planned_config(args) if getattr(args, "plan", None) is not None else \
        OffloadConfig.from_yaml(args.config) if getattr(args, "config", None) else OffloadConfig()
    fields = {"device": args.device, "dtype": args.dtype, "gpu_memory": args.gpu_memory,
              "expert_slots": args.expert_slots, "expert_dtype": getattr(args, "expert_dtype", None),
              "host_memory": getattr(args, "host_memory", None)} | extra
    return cfg.replace(**{k: v for k, v in fields.items() if v is not None})


PLAN_DEVICE_MARGIN = 2**30   # device memory a plan leaves to the CUDA context and other users (no --gpu-memory)


def planned_config(args: argparse.Namespace) -> OffloadConfig:
    """``--plan``: the cached plan for this model, memory and profile (searched now on a miss)."""
    from ..simulate.plan import PlanRequest
    from ..simulate.plan_cache import cached_plan

    if args.config:
        raise MoEOffloadError("give either --plan or --config, not both (write the plan with `moe-offload plan "
                              "--out FILE` and edit it to combine them)")
    if args.expert_slots is not None:
        raise MoEOffloadError("--plan picks the expert slots itself; give --gpu-memory (or nothing) instead of "
                              "--expert-slots")
    request = PlanRequest(args.model, plan_gpu_memory(args), parse_bytes(args.host_memory) if args.host_memory
                          else None)
    found = cached_plan(request, args.plan or None)
    if found.hit:
        print(f"[moe-offload] plan read from {found.path}", flush=True)
    else:
        print(f"[moe-offload] planned: {found.result.summary()}; kept in {found.path}", flush=True)
    return found.config


def plan_gpu_memory(args: argparse.Namespace) -> int:
    """The device memory a plan is made for: --gpu-memory, else the GPU's total less PLAN_DEVICE_MARGIN."""
    import torch

    if args.gpu_memory:
        return parse_bytes(args.gpu_memory)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        raise MoEOffloadError("--plan on the CPU needs --gpu-memory (the memory the model may use there)")
    return torch.cuda.get_device_properties(device).total_memory - PLAN_DEVICE_MARGIN


def add_prompt_args(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """--prompts | --stdlib-heldout N | --stdlib-train N (one required); returns the group."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help=".jsonl (a JSON string or {\"prompt\": ...} per line) or text, "
                                          "one prompt per line")
    source.add_argument("--stdlib-heldout", type=positive_int, metavar="N",
                        help="N prompts from standard-library files the shipped models never trained on")
    source.add_argument("--stdlib-train", type=positive_int, metavar="N",
                        help="N prompts from the shipped models' training files (for fitting predictors)")
    p.add_argument("--prompt-lines", type=positive_int, default=PROMPT_LINES,
                   help=f"lines of each stdlib file used as its prompt (default {PROMPT_LINES})")
    return source


def prompts_from_args(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif args.stdlib_heldout is not None:
        prompts = stdlib_prompts(args.stdlib_heldout, held_out=True, lines=args.prompt_lines)
    else:
        prompts = stdlib_prompts(args.stdlib_train, held_out=False, lines=args.prompt_lines)
    if not prompts:
        raise MoEOffloadError("no prompts to trace (the prompts file is empty)")
    return prompts


def prompt_source(args: argparse.Namespace) -> str:
    """How the prompts were chosen, for the trace's metadata."""
    if args.prompts:
        return f"file {Path(args.prompts).name}"
    if args.stdlib_heldout is not None:
        return f"stdlib-heldout {args.stdlib_heldout} x {args.prompt_lines} lines"
    return f"stdlib-train {args.stdlib_train} x {args.prompt_lines} lines"


def load_tokenizer(model):
    """The tokenizer saved beside a loaded model's weights."""
    return tokenizer_at(model.config._name_or_path)


def tokenizer_at(directory: str):
    """The tokenizer of the checkpoint at ``directory`` (a loaded model's ``config._name_or_path``)."""
    from ..loading.tokenizer import load_tokenizer as checkpoint_tokenizer

    try:
        return checkpoint_tokenizer(directory)
    except (OSError, ValueError):
        raise MoEOffloadError(f"{directory} has no tokenizer files; tracing needs them (tokenizer.json etc.)") from None


def record_prompts(args: argparse.Namespace, model, prompts: list[str], gate_inputs: bool):
    """The routing trace of greedy generation from ``prompts`` (``--max-new-tokens`` each), with where the
    prompts came from in its metadata."""
    from ..runtime.tracing import record_trace

    trace = record_trace(model, load_tokenizer(model), prompts, args.max_new_tokens, gate_inputs=gate_inputs,
                         progress=model.offload.config.progress)
    trace.meta |= {"prompts": prompt_source(args), "max_new_tokens": args.max_new_tokens}
    return trace
