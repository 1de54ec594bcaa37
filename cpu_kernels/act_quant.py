"""Activation rounding of the activation-quantized expert formats (``*-a8``): its one definition.

    # T = tokens, K = input width of a projection, NB = ceil(K / ACT_BLOCK) blocks per token
    x     float [T, K]
    q     int8    [T, K]    q = round_half_even(x / scale[block]) in [-127, 127]
    scale float32 [T, NB]   scale = max |x| over the block / 127 (0 for an all-zero block: q = 0)
    fake_quantize(x) = q * scale[block]   (what a device computes with, cast to its dtype)

An ``-a8`` expert rounds its input x before gate_up and its hidden h = act(gate) * up before down,
each token and each block of ACT_BLOCK consecutive inputs on its own (the last block may be short).
The CPU kernels then accumulate int8 x int8 (int4 codes x int8) products exactly in int32 per block;
the device path and the parity reference run ``fake_quantize`` then the dequantized matmul, so an
expert computes the same function wherever it runs (up to float summation order).

ACT_BLOCK divides every int4 group size (64, 128), so one block never straddles two weight groups.
The numba quantizer (``quantize_rows``) performs the same float32 operations as the torch one and is
tested bit for bit against it.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

ACT_BLOCK = 64
Q_MAX = 127.0


def act_blocks(width: int) -> int:
    """Blocks per token of a K-wide activation."""
    return -(-int(width) // ACT_BLOCK)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (q int8 [T, K], scale float32 [T, NB]): the reference rounding (module docstring)."""
    tokens, width = x.shape
    blocks = act_blocks(width)
    padded = torch.zeros(tokens, blocks * ACT_BLOCK, dtype=torch.float32, device=x.device)
    padded[:, :width] = x.float()
    grouped = padded.view(tokens, blocks, ACT_BLOCK)                               # [T, NB, B]
    scale = grouped.abs().amax(dim=-1) / Q_MAX                                     # [T, NB]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(grouped / safe[..., None]).clamp_(-Q_MAX, Q_MAX)              # [T, NB, B]
    return q.view(tokens, -1)[:, :width].to(torch.int8), scale


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded as an ``-a8`` kernel rounds it, in x's dtype: q * scale per block."""
    flat = x.reshape(-1, x.shape[-1])                                              # [T, K]
    q, scale = quantize_activations(flat)
    blocks = torch.arange(flat.shape[1], device=x.device) // ACT_BLOCK             # [K] block of each input
    return (q.float() * scale[:, blocks]).to(x.dtype).view(x.shape)


@njit(nogil=True, cache=True)
def quantize_rows(x, q, scale, qsum, deinterleave):
    """numba twin of quantize_activations: x float32 [T, K] -> q [T, K] (int16 holding the int8 codes: the
    kernels multiply int16 pairs, so no widening in their loops), scale float32 [T, NB] and
    qsum int32 [T, NB] (the sum of each block's codes). With ``deinterleave`` q[t] holds the even
    inputs, then the odd ones (the order int4 kernels read a row in). No fastmath: the division and
    rounding are the reference's float32 operations."""
    tokens, width = x.shape
    half = width // 2
    for t in range(tokens):
        for b in range((width + ACT_BLOCK - 1) // ACT_BLOCK):
            k0, k1 = b * ACT_BLOCK, min(width, (b + 1) * ACT_BLOCK)
            amax = np.float32(0.0)
            for k in range(k0, k1):
                amax = max(amax, abs(x[t, k]))
            s = amax / np.float32(Q_MAX)
            scale[t, b] = s
            total = 0
            for k in range(k0, k1):
                v = np.float32(0.0)
                if s > 0:
                    v = min(max(np.rint(x[t, k] / s), np.float32(-Q_MAX)), np.float32(Q_MAX))
                code = np.int16(v)
                total += code
                if deinterleave:
                    q[t, (k % 2) * half + k // 2] = code
                else:
                    q[t, k] = code
            qsum[t, b] = total

