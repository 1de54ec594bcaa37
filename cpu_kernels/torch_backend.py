"""The torch backend of the CPU expert FFN: the same computation as the Numba kernels through F.linear.

    # T = tokens, H = hidden, I = intermediate
    native blocks (float32 / float16 / bf16): torch.from_numpy views, F.linear in the block's dtype
        (oneDNN's bf16 matmuls beat the Numba kernels for many tokens on CPUs with AVX-512 BF16 or AMX);
    int8 blocks and packed rows: dequantized into one reused float32 scratch, then F.linear in float32
        ("-a8" formats: each matmul's input rounded as their Numba kernels round it, act_quant.py; in bf16
        and float32 by packed_kernels.fake_quantize_rows, bit for bit the torch rounding);
    int4 rows (every group size, "-a8" too) with a float32 or bfloat16 compute dtype: dequantized by a
        parallel Numba kernel (packed_kernels.dequantize_int4_exact) into a scratch of the compute dtype,
        bit for bit the weights a device dequantizes into, with their columns deinterleaved (each
        matmul's input reordered to match), then F.linear in that dtype (oneDNN's bf16 matmul for
        prefill on CPUs with AVX-512 BF16 or AMX).
    out [T, H] float32 = down @ (act(gate @ x) * (up @ x))

The runner chooses between this and the Numba kernels per format and token count (backends.py).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from .activations import GELU, GELU_TANH, SILU
from .blocks import as_torch_block
from .packed import ExpertFormat, expert_forward
from .packed_kernels import dequantize_int4_exact, fake_quantize_rows

_TORCH_ACTS = {SILU: F.silu, GELU: F.gelu, GELU_TANH: lambda v: F.gelu(v, approximate="tanh")}


class TorchExperts:
    """Runs experts with torch matmuls; one float32 dequantization scratch, grown once to the largest expert."""

    def __init__(self) -> None:
        self._scratch = torch.empty(0)
        self._int4_scratch: dict[torch.dtype, np.ndarray] = {}   # compute dtype -> float32 or uint16 (bf16 bits)

    def _weights(self, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) float32 views of the scratch."""
        need = 3 * hidden * inter
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need)
        split = 2 * inter * hidden
        return self._scratch[:split].view(2 * inter, hidden), self._scratch[split:need].view(hidden, inter)

    def matrices(self, block: np.ndarray, hidden: int, inter: int, scales=None, fmt: ExpertFormat | None = None):
        """(gate_up, down) torch matrices of one expert: views of a native block, or dequantized into the scratch."""
        if fmt is not None and fmt.packed:
            if _deinterleaved(fmt):
                return self._int4(block, fmt)
            return fmt.unpack(torch.from_numpy(block), self._scratch_for(fmt))
        if scales is not None:                      # int8 block: W[r] = scales[r] * q[r]
            gate_up, down = self._weights(hidden, inter)
            q, s = torch.from_numpy(block), torch.from_numpy(scales)
            split = 2 * inter * hidden
            gate_up.copy_(q[:split].view(2 * inter, hidden)).mul_(s[: 2 * inter, None])
            down.copy_(q[split:].view(hidden, inter)).mul_(s[2 * inter:, None])
            return gate_up, down
        weights = as_torch_block(block)
        split = 2 * inter * hidden
        return weights[:split].view(2 * inter, hidden), weights[split:].view(hidden, inter)

    def _int4(self, block: np.ndarray, fmt: ExpertFormat) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of an int4 row in fmt.compute_dtype, columns deinterleaved."""
        h, i = fmt.hidden, fmt.inter
        numpy_dtype = np.float32 if fmt.compute_dtype == torch.float32 else np.uint16
        scratch = self._int4_scratch.get(fmt.compute_dtype)
        if scratch is None or scratch.size < 3 * h * i:
            scratch = self._int4_scratch[fmt.compute_dtype] = np.empty(3 * h * i, dtype=numpy_dtype)
        views = fmt.numpy_views(block)
        gate_up, down = scratch[: 2 * i * h].reshape(2 * i, h), scratch[2 * i * h: 3 * i * h].reshape(h, i)
        for name, out in (("gate_up", gate_up), ("down", down)):
            dequantize_int4_exact(views[name], views[f"{name}_scale"].view(np.int16),
                                  views[f"{name}_zero"].view(np.int16), fmt.group, out)
        return tuple(torch.from_numpy(m).view(fmt.compute_dtype) for m in (gate_up, down))

    def _scratch_for(self, fmt: ExpertFormat) -> torch.Tensor:
        self._weights(fmt.hidden, fmt.inter)
        return self._scratch

    def run(self, x: np.ndarray, block: np.ndarray, inter: int, act: int, out: np.ndarray, scales=None,
            fmt: ExpertFormat | None = None) -> None:
        """out [n, H] = expert(x [n, H]) (act: a kernel activation code)."""
        gate_up, down = self.matrices(block, x.shape[1], inter, scales, fmt)
        xt = torch.from_numpy(x).to(gate_up.dtype)                          # [n, H]
        rounding = fmt.round_activations if fmt is not None else None
        columns = _deinterleave if fmt is not None and fmt.packed and _deinterleaved(fmt) else None
        if fmt is not None and fmt.act_quant and xt.dtype in _ROUNDED:   # both in one Numba pass, bit for bit
            rounding, columns = partial(_round_rows, deinterleave=columns is not None), None
        torch.from_numpy(out).copy_(expert_forward(xt, gate_up, down, _TORCH_ACTS[act], rounding, columns))


def _deinterleaved(fmt: ExpertFormat) -> bool:
    """Whether the torch backend dequantizes ``fmt`` with the Numba int4 kernel (deinterleaved columns)."""
    return bool(getattr(fmt, "group", 0)) and fmt.compute_dtype in (torch.float32, torch.bfloat16)


_ROUNDED = (torch.bfloat16, torch.float32)   # the dtypes fake_quantize_rows reads (bf16 as uint16 bits)


def _round_rows(v: torch.Tensor, deinterleave: bool) -> torch.Tensor:
    """act_quant.fake_quantize(v) [t, K] (then deinterleaved) by packed_kernels.fake_quantize_rows: the same
    values, 1.6-2x faster than the torch ops at 64 x 3584 on a 2-core AVX-512 EPYC."""
    v = v.contiguous()
    source = v.view(torch.int16).numpy().view(np.uint16) if v.dtype == torch.bfloat16 else v.numpy()
    out = np.empty_like(source)
    fake_quantize_rows(source, out, deinterleave)
    return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16) if v.dtype == torch.bfloat16 else torch.from_numpy(out)


def _deinterleave(v: torch.Tensor) -> torch.Tensor:
    """[t, K] -> its even columns, then its odd ones (the column order of dequantize_int4_exact's output)."""
    return torch.cat([v[:, 0::2], v[:, 1::2]], dim=1)

