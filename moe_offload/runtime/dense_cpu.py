"""Dense layers on a CPU-only run: each nn.Linear runs in the fastest of the model's dtype, a float32 upcast and
the project's Numba kernel.

    # T = tokens, K = in features, N = out features
    native:  y = linear(x, W)                                 x [T, K], W [N, K] in the model's dtype (bf16, fp16)
    upcast:  y = linear(x.float(), W32).to(dtype)             W32: a float32 copy of W, kept beside it
    kernel:  y = linear_rows(x.float(), W).to(dtype)          W's own bits widened in registers, float32 sums
                                                              (cpu_kernels.kernels.linear_rows; no copy of W)

torch's low-precision CPU GEMV can stream its weights slower than its float32 one on CPUs without native
bf16 dot products (on an AVX2 machine: 6.6 GB/s in bf16 against 15.5 GB/s in float32). Which one wins
depends on the CPU, the shape and the token count (bf16 GEMMs with AVX-512 BF16 or AMX win at many rows
while float32 wins the GEMV), so it is measured at load per distinct weight shape and TOKEN_COUNTS rows,
on copies cycled so the weights come from memory as in use (as the CPU expert backends are chosen:
cpu_kernels/backends.py); calls up to the largest count where the kernel beat both run on the kernel, then
calls up to the largest count where the upcast beat native run upcast. torch's bf16 GEMV streams its weights
at about half the Numba kernel's speed on a 2-core AVX-512 EPYC. Upcast and kernel layers compute the exact
products of the same bf16 weights in float32 and round once: at least as exact as the native matmul, so the
parity tolerance holds either way. The routed experts are not nn.Linear modules and are untouched.
A choice is measured once per machine and shape and kept in the user's cache folder (measured_choice);
delete $XDG_CACHE_HOME/moe-offload/dense to measure again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..cpu_kernels.backends import COPIES_BYTES, alternated_medians
from ..cpu_kernels.kernels import linear_rows

KERNEL_DTYPES = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}   # the bit views formats.widen reads

CPU_DENSE = ("auto", "native", "float32", "kernel")
TOKEN_COUNTS = (1, 4, 16, 64)   # rows per call timed, smallest first; a count where native wins ends the search
MEASURE_S = 0.05                # seconds of timing per (shape, variant, token count)
MAX_COPIES = 64                 # copies of a small weight cycled (enough to leave the cache)


@dataclass(frozen=True)
class DenseTiming:
    """Median seconds of one Linear shape per token count, native, upcast and (where timed) the Numba kernel
    (counts after the first that native won are not timed)."""

    shape: tuple[int, int]               # (N, K)
    native_s: dict[int, float]
    upcast_s: dict[int, float]
    kernel_s: dict[int, float] = field(default_factory=dict)

    @property
    def kernel_tokens(self) -> int:
        """Calls of up to this many rows run on the Numba kernel: the largest timed count up to which it beat
        native and upcast at every count (0: none)."""
        best = 0
        for t in sorted(self.native_s):
            if t not in self.kernel_s or self.kernel_s[t] >= min(self.native_s[t], self.upcast_s.get(t, math.inf)):
                break
            best = t
        return best

    @property
    def upcast_tokens(self) -> int:
        """Calls of up to this many rows run upcast: the largest timed count up to which the upcast won at
        every count (0: none)."""
        best = 0
        for t in sorted(self.native_s):
            if t not in self.upcast_s or self.upcast_s[t] >= self.native_s[t]:
                break
            best = t
        return best


class UpcastLinear(nn.Linear):
    """An nn.Linear (the same weight and bias parameters, in the model's dtype) that runs calls of up to
    ``kernel_tokens`` rows on the Numba kernel, calls of up to ``upcast_tokens`` rows in float32 from a float32
    copy of its weights (made only when some call can use it), and larger calls natively."""

    def __init__(self, linear: nn.Linear, upcast_tokens: int, kernel_tokens: int = 0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.kernel_tokens = kernel_tokens if linear.weight.dtype in KERNEL_DTYPES else 0
        self.upcast_tokens = upcast_tokens if upcast_tokens > self.kernel_tokens else 0
        copy = self.upcast_tokens > 0
        self.register_buffer("weight_float32", linear.weight.detach().float() if copy else None, persistent=False)
        bias = None if linear.bias is None or not copy else linear.bias.detach().float()
        self.register_buffer("bias_float32", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # x [..., K] -> [..., N]
        rows = x.numel() // max(x.shape[-1], 1)
        if rows <= self.kernel_tokens:
            return self._kernel(x)
        if rows <= self.upcast_tokens:
            return F.linear(x.float(), self.weight_float32, self.bias_float32).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, self.in_features).float().contiguous()                 # [T, K]
        out = np.empty((flat.shape[0], self.out_features), dtype=np.float32)                  # [T, N]
        linear_rows(flat.numpy(), _bits(self.weight), out)
        y = torch.from_numpy(out)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def _bits(weight: torch.Tensor) -> np.ndarray:
    """[N, K] numpy view of a bf16 / fp16 weight's bits (uint16 / int16), no copy."""
    return weight.detach().view(KERNEL_DTYPES[weight.dtype]).numpy()


def dense_linears(model: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) of the model's plain nn.Linear layers in ``dtype`` on the CPU."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear and child.weight.dtype == dtype and child.weight.device.type == "cpu"]


def time_shape(weight: torch.Tensor, tokens: tuple[int, ...] = TOKEN_COUNTS) -> DenseTiming:
    """Native and upcast seconds of a Linear with ``weight``'s shape and dtype, weights cycled through copies
    (COPIES_BYTES of each variant) so they are read from memory, not from the cache."""
    native, upcast = _copies(weight), _copies(weight.float())
    kernel = native if weight.dtype in KERNEL_DTYPES else None
    if kernel is not None:
        _cycle_kernel(kernel[:1], torch.zeros(1, weight.shape[1], dtype=weight.dtype))   # compiled before timing
    native_s, upcast_s, kernel_s = {}, {}, {}
    for t in tokens:
        x = torch.randn(t, weight.shape[1], generator=torch.Generator().manual_seed(t)).to(weight.dtype)  # [T, K]
        variants = {"native": partial(_cycle, native, x, False), "upcast": partial(_cycle, upcast, x, True)}
        if kernel is not None:
            variants["kernel"] = partial(_cycle_kernel, kernel, x)
        seconds = alternated_medians(variants, MEASURE_S * len(variants), min_runs=1)
        native_s[t], upcast_s[t] = seconds["native"], seconds["upcast"]
        if kernel is not None:
            kernel_s[t] = seconds["kernel"]
        if min(upcast_s[t], kernel_s.get(t, math.inf)) >= native_s[t]:
            break
    return DenseTiming(tuple(weight.shape), native_s, upcast_s, kernel_s)


def _copies(weight: torch.Tensor) -> list[torch.Tensor]:
    count = min(MAX_COPIES, max(1, math.ceil(COPIES_BYTES / (weight.numel() * weight.element_size()))))
    return [weight.detach().clone() for _ in range(count)]


def _cycle_kernel(weights: list[torch.Tensor], x: torch.Tensor) -> None:
    """One Numba-kernel call per copy, as UpcastLinear._kernel makes it."""
    flat = x.float().contiguous().numpy()
    for w in weights:
        out = np.empty((flat.shape[0], w.shape[0]), dtype=np.float32)
        linear_rows(flat, _bits(w), out)
        torch.from_numpy(out).to(x.dtype)


def _cycle(weights: list[torch.Tensor], x: torch.Tensor, upcast: bool) -> None:
    """One call per copy: y = linear(x, W) [T, N], in float32 then cast back when ``upcast``."""
    for w in weights:
        if upcast:
            F.linear(x.float(), w).to(x.dtype)
        else:
            F.linear(x, w)


DENSE_CACHE_VERSION = 1   # bump when the variants or their timing change: every kept choice is measured again


def dense_cache_dir() -> Path:
    """$XDG_CACHE_HOME/moe-offload/dense (~/.cache/... by default): the measured choices, one file per key."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-offload" / "dense"


def _choice_key(weight: torch.Tensor) -> str:
    """What a measured choice depends on: the CPU (model name and features), the thread counts, the torch
    and numba versions, the weight's dtype and shape."""
    import numba
    from llvmlite import binding

    features = sorted(name for name, on in binding.get_host_cpu_features().items() if on)
    facts = {"version": DENSE_CACHE_VERSION, "cpu": platform.processor() or platform.machine(),
             "cpu_name": binding.get_host_cpu_name(), "features": features, "torch": torch.__version__,
             "numba": numba.__version__, "torch_threads": torch.get_num_threads(),
             "numba_threads": numba.get_num_threads(), "dtype": str(weight.dtype), "shape": list(weight.shape)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def measured_choice(weight: torch.Tensor) -> tuple[int, int]:
    """(kernel_tokens, upcast_tokens) of ``weight``'s shape on this machine: read from the dense cache, else
    timed now (time_shape, about 0.2-0.5 s a shape) and kept there. An unreadable cache file is timed again
    and rewritten; a cache folder that cannot be written only costs the timing at the next load."""
    path = dense_cache_dir() / f"{_choice_key(weight)}.json"
    try:
        kept = json.loads(path.read_text())
        return int(kept["kernel_tokens"]), int(kept["upcast_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    timing = time_shape(weight)
    choice = (timing.kernel_tokens, timing.upcast_tokens)
    record = {"kernel_tokens": choice[0], "upcast_tokens": choice[1], "shape": list(weight.shape),
              "dtype": str(weight.dtype), "native_s": timing.native_s, "upcast_s": timing.upcast_s,
              "kernel_s": timing.kernel_s}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial_path = path.with_suffix(f".{os.getpid()}.tmp")
        partial_path.write_text(json.dumps(record))
        partial_path.replace(path)
    except OSError:
        pass
    return choice


def choose_dense_precision(model: nn.Module, dtype: torch.dtype, mode: str) -> dict[tuple[int, int], tuple[int, int]]:
    """Apply ``mode`` to the model's dense nn.Linear layers in ``dtype`` ('auto': measured per shape once per
    machine, measured_choice; 'float32':
    every call upcast; 'kernel': every call on the Numba kernel (bf16 / fp16); 'native': none; a float32 model
    has nothing to do): each layer whose shape gains
    becomes an UpcastLinear. Returns {(N, K): (rows up to which calls run on the kernel, then upcast)}."""
    if mode == "native" or dtype == torch.float32:
        return {}
    layers = dense_linears(model, dtype)
    chosen: dict[tuple[int, int], tuple[int, int]] = {}
    for _, _, linear in layers:
        shape = tuple(linear.weight.shape)
        if shape not in chosen:
            if mode == "auto":
                chosen[shape] = measured_choice(linear.weight)
            elif mode == "kernel":
                chosen[shape] = (torch.iinfo(torch.int64).max, 0)
            else:
                chosen[shape] = (0, torch.iinfo(torch.int64).max)
    for parent, name, linear in layers:
        kernel_tokens, upcast_tokens = chosen[tuple(linear.weight.shape)]
        if kernel_tokens > 0 or upcast_tokens > 0:
            setattr(parent, name, UpcastLinear(linear, upcast_tokens, kernel_tokens))
    return chosen
