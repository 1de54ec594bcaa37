"""`moe-offload calibrate`: time copies, device and CPU expert compute; write a hardware profile."""

from __future__ import annotations

import argparse

import torch

from .argtypes import positive_int
from .common import DEFAULT_MODEL, offload_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``calibrate`` subcommand."""
    p = subparsers.add_parser("calibrate", help="measure copy, device and CPU expert costs; write a hardware profile")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint whose expert shape is measured")
    p.add_argument("--device", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", help="expert dtype (default: the checkpoint's)")
    p.add_argument("--name", default="local",
                   help="profile name: written to $XDG_CONFIG_HOME/moe-offload/hardware/NAME.yaml "
                        "(~/.config/... by default, never into the installed package), where "
                        "--hardware NAME / hardware: NAME finds it before the shipped profiles")
    p.add_argument("--out", help="YAML path to write instead (use it with --hardware PATH)")
    p.add_argument("--cpu-threads", type=positive_int)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.set_defaults(func=main, config=None, gpu_memory=None, expert_slots=None)


def main(args: argparse.Namespace) -> int:
    """Time copies, device and CPU expert compute for the model's expert shape; save a profile."""
    from ..cpu_kernels import CpuRunner
    from ..loading.parts import ModelParts
    from ..runtime.calibrate import measure_profile
    from ..runtime.cost import CostModel, user_profile_dir
    from ..transfer.pinning import pinned_empty

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
    from ..cpu_kernels.packed import PACKED

    formats = [str(parts.dtype).removeprefix("torch."), *PACKED]   # CPU backend and seconds for every format
    runner.warmup(dtypes=[], acts=[parts.hf_config.hidden_act], packed=list(PACKED))
    profile = measure_profile(host, slot, parts.shape, runner, name=args.name, repeats=args.repeats,
                              cpu_formats=formats)
    out = args.out or user_profile_dir() / f"{args.name}.yaml"
    profile.to_yaml(out)
    costs = CostModel.for_expert(profile, parts.shape.hidden, parts.shape.intermediate, parts.dtype.itemsize,
                                parts.format.nbytes, parts.format.name)
    print(f"copy {profile.h2d_gbps:.2f} GB/s, device {profile.gpu_mem_gbps:.1f} GB/s / "
          f"{profile.gpu_tflops:.3f} TFLOP/s, CPU {profile.cpu_mem_gbps:.1f} GB/s / {profile.cpu_gflops:.1f} GFLOP/s")
    for tokens in (1, 8, 64):
        print(f"  {tokens:>3} tokens: copy {costs.copy_s() * 1e3:.3f} ms + device {costs.gpu_s(tokens) * 1e3:.3f} ms"
              f" vs CPU {costs.cpu_s(tokens) * 1e3:.3f} ms")
    print(f"wrote {out}")
    return 0
