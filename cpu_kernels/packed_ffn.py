"""Packed (quantized) experts on the CPU: dequantized into one reused float32 scratch, then torch's matmuls.

    # T = tokens, H = hidden, I = intermediate
    out [T, H] = down @ (act(gate @ x) * (up @ x)), the weights from ExpertFormat.unpack
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .activations import GELU, GELU_TANH, SILU
from .packed import ExpertFormat

_TORCH_ACTS = {SILU: F.silu, GELU: F.gelu, GELU_TANH: lambda v: F.gelu(v, approximate="tanh")}


def check_packed(row: np.ndarray, fmt: ExpertFormat, hidden: int) -> int:
    """Validate a packed row against its format; returns I."""
    if not isinstance(row, np.ndarray) or row.dtype != np.uint8 or row.ndim != 1:
        raise ValueError(f"a packed {fmt.name} expert is a 1-D uint8 numpy row, got {getattr(row, 'dtype', row)}")
    if row.size != fmt.nbytes or fmt.hidden != hidden:
        raise ValueError(f"packed {fmt.name} row of {row.size} bytes for H={hidden}; the format expects "
                         f"{fmt.nbytes} bytes for H={fmt.hidden}")
    return fmt.inter


class PackedExperts:
    """Runs packed experts with one float32 scratch for the dequantized weights, grown once."""

    def __init__(self) -> None:
        self._scratch = torch.empty(0)

    def run(self, fmt: ExpertFormat, row: np.ndarray, x: np.ndarray, act: int, out: np.ndarray) -> None:
        """out [n, H] = expert(x [n, H]) for the packed ``row`` of format ``fmt``."""
        need = 3 * fmt.hidden * fmt.inter
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need)
        gate_up, down = fmt.unpack(torch.from_numpy(row), self._scratch)   # float32, the kernels' precision
        xt = torch.from_numpy(x)
        gate, up = F.linear(xt, gate_up).chunk(2, dim=-1)                  # [n, I] each
        torch.from_numpy(out).copy_(F.linear(_TORCH_ACTS[act](gate) * up, down))

