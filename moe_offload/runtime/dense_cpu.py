"""Dense layers on a CPU-only run: each nn.Linear runs in the faster of the model's dtype and a float32 upcast.

    # T = tokens, K = in features, N = out features
    native:  y = linear(x, W)                                 x [T, K], W [N, K] in the model's dtype (bf16, fp16)
    upcast:  y = linear(x.float(), W32).to(dtype)             W32: a float32 copy of W, kept beside it

torch's low-precision CPU GEMV can stream its weights slower than its float32 one on CPUs without native
bf16 dot products (on an AVX2 machine: 6.6 GB/s in bf16 against 15.5 GB/s in float32). Which one wins
depends on the CPU, the shape and the token count (bf16 GEMMs with AVX-512 BF16 or AMX win at many rows
while float32 wins the GEMV), so it is measured at load per distinct weight shape and TOKEN_COUNTS rows,
on copies cycled so the weights come from memory as in use (as the CPU expert backends are chosen:
cpu_kernels/backends.py); calls up to the largest count where the upcast won run upcast. An upcast layer computes the exact products
of the same bf16 weights in float32 and rounds once: at least as exact as the native matmul, so the parity
tolerance holds either way. The routed experts are not nn.Linear modules and are untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from ..cpu_kernels.backends import COPIES_BYTES, median_time

CPU_DENSE = ("auto", "native", "float32")
TOKEN_COUNTS = (1, 4, 16, 64)   # rows per call timed, smallest first; a count where native wins ends the search
MEASURE_S = 0.05                # seconds of timing per (shape, variant, token count)
GIVE_UP = 4.0                   # the upcast is timed no further when its first call takes this many times native's
MAX_COPIES = 64                 # copies of a small weight cycled (enough to leave the cache)


@dataclass(frozen=True)
class DenseTiming:
    """Median seconds of one Linear shape per token count, native and upcast (counts after the first that
    native won are not timed)."""

    shape: tuple[int, int]               # (N, K)
    native_s: dict[int, float]
    upcast_s: dict[int, float]

    @property
    def upcast_tokens(self) -> int:
        """Calls of up to this many rows run upcast: the largest timed count up to which the upcast won at
        every count (0: none)."""
        best = 0
        for t in sorted(self.native_s):
            if self.upcast_s[t] >= self.native_s[t]:
                break
            best = t
        return best


class UpcastLinear(nn.Linear):
    """An nn.Linear (the same weight and bias parameters, in the model's dtype) that runs calls of up to
    ``upcast_tokens`` rows in float32 from a float32 copy of its weights, and larger calls natively."""

    def __init__(self, linear: nn.Linear, upcast_tokens: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.upcast_tokens = upcast_tokens
        self.register_buffer("weight_float32", linear.weight.detach().float(), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias_float32", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # x [..., K] -> [..., N]
        if x.numel() // max(x.shape[-1], 1) <= self.upcast_tokens:
            return F.linear(x.float(), self.weight_float32, self.bias_float32).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def dense_linears(model: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) of the model's plain nn.Linear layers in ``dtype`` on the CPU."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear and child.weight.dtype == dtype and child.weight.device.type == "cpu"]


def time_shape(weight: torch.Tensor, tokens: tuple[int, ...] = TOKEN_COUNTS) -> DenseTiming:
    """Native and upcast seconds of a Linear with ``weight``'s shape and dtype, weights cycled through copies
    (COPIES_BYTES of each variant) so they are read from memory, not from the cache."""
    native, upcast = _copies(weight), _copies(weight.float())
    native_s, upcast_s = {}, {}
    for t in tokens:
        x = torch.randn(t, weight.shape[1], generator=torch.Generator().manual_seed(t)).to(weight.dtype)  # [T, K]
        native_s[t] = median_time(partial(_cycle, native, x, False), MEASURE_S, min_runs=1)
        upcast_s[t] = median_time(partial(_cycle, upcast, x, True), MEASURE_S, min_runs=1,
                                  give_up_s=GIVE_UP * native_s[t])
        if upcast_s[t] >= native_s[t]:
            break
    return DenseTiming(tuple(weight.shape), native_s, upcast_s)


def _copies(weight: torch.Tensor) -> list[torch.Tensor]:
    count = min(MAX_COPIES, max(1, math.ceil(COPIES_BYTES / (weight.numel() * weight.element_size()))))
    return [weight.detach().clone() for _ in range(count)]


def _cycle(weights: list[torch.Tensor], x: torch.Tensor, upcast: bool) -> None:
    """One call per copy: y = linear(x, W) [T, N], in float32 then cast back when ``upcast``."""
    for w in weights:
        if upcast:
            F.linear(x.float(), w).to(x.dtype)
        else:
            F.linear(x, w)


def choose_dense_precision(model: nn.Module, dtype: torch.dtype, mode: str) -> dict[tuple[int, int], int]:
    """Apply ``mode`` to the model's dense nn.Linear layers in ``dtype`` ('auto': measured per shape; 'float32':
    every call upcast; 'native': none; a float32 model has nothing to do): each layer whose shape gains
    becomes an UpcastLinear. Returns {(N, K): rows up to which calls run upcast}."""
    if mode == "native" or dtype == torch.float32:
        return {}
    layers = dense_linears(model, dtype)
    chosen: dict[tuple[int, int], int] = {}
    for _, _, linear in layers:
        shape = tuple(linear.weight.shape)
        if shape not in chosen:
            chosen[shape] = time_shape(linear.weight).upcast_tokens if mode == "auto" else torch.iinfo(torch.int64).max
    for parent, name, linear in layers:
        if chosen[tuple(linear.weight.shape)] > 0:
            setattr(parent, name, UpcastLinear(linear, chosen[tuple(linear.weight.shape)]))
    return chosen
