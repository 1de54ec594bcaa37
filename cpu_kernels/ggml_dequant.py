"""GGML block dequantization on the CPU: Numba parallel kernels, bit for bit ``ggml_blocks.dequantize``.

    # N = blocks, B = values per block (32 or 256), S = sub-blocks

The block layouts are ``ggml_blocks``' (its docstring draws them). The torch version there runs on any
device (the engine's reused scratch on the GPU); these kernels are the CPU's: one pass over the blocks,
split across the cores, with the same float32 operations in the same order (no fast-math, so nothing is
fused or reordered), hence the same values. They are what a GGUF's dense tensors are read with, and
what the CPU runner widens a GGUF expert with.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .ggml_blocks import QK_K, GGMLType, dequantize

# Byte offsets of the float16 scale(s) in each block type.
_SCALE_AT = {"Q8_0": (0,), "Q4_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _halves(blocks: np.ndarray, at: int) -> np.ndarray:
    """float32 [N]: the float16 stored at byte ``at`` of each block [N, nbytes]."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32).reshape(-1)


@numba.njit(parallel=True, nogil=True, cache=True)
def _q8_0(blocks, d, out):
    for n in numba.prange(blocks.shape[0]):
        for j in range(32):
            out[n, j] = np.float32(np.int8(blocks[n, 2 + j])) * d[n]


@numba.njit(parallel=True, nogil=True, cache=True)
def _q4_0(blocks, d, out):
    for n in numba.prange(blocks.shape[0]):
        for j in range(16):
            byte = blocks[n, 2 + j]
            out[n, j] = d[n] * np.float32(np.int8(byte & 15) - 8)
            out[n, j + 16] = d[n] * np.float32(np.int8(byte >> 4) - 8)


@numba.njit(inline="always")
def _scale_min_k4(blocks, n, s):
    """Sub-block ``s``'s 6-bit scale and min of a Q4_K / Q5_K block (packed in bytes 4..15)."""
    if s < 4:
        return blocks[n, 4 + s] & 0x3F, blocks[n, 8 + s] & 0x3F
    sc = (blocks[n, 12 + s - 4] & 0x0F) | ((blocks[n, 4 + s - 4] >> 2) & 0x30)
    mn = (blocks[n, 12 + s - 4] >> 4) | ((blocks[n, 8 + s - 4] >> 2) & 0x30)
    return sc, mn


@numba.njit(parallel=True, nogil=True, cache=True)
def _q45_k(blocks, d, dmin, fifth_bit, out):
    """Q4_K (``fifth_bit`` False: codes at byte 16) and Q5_K (codes at byte 48, fifth bits at 16..47)."""
    codes_at = 48 if fifth_bit else 16
    for n in numba.prange(blocks.shape[0]):
        for s in range(8):
            sc, mn = _scale_min_k4(blocks, n, s)
            scale = d[n] * np.float32(sc)
            offset = dmin[n] * np.float32(mn)
            shift = 4 * (s & 1)
            for i in range(32):
                q = (blocks[n, codes_at + (s >> 1) * 32 + i] >> shift) & 15
                if fifth_bit:
                    q |= ((blocks[n, 16 + i] >> s) & 1) << 4
                out[n, s * 32 + i] = scale * np.float32(q) - offset


@numba.njit(parallel=True, nogil=True, cache=True)
def _q6_k(blocks, d, out):
    for n in numba.prange(blocks.shape[0]):
        for p in range(QK_K):
            half, j, i = p // 128, (p % 128) // 32, p % 32
            low = (blocks[n, half * 64 + (j % 2) * 32 + i] >> (4 * (j // 2))) & 15
            high = (blocks[n, 128 + half * 32 + i] >> (2 * j)) & 3
            q = np.int8(low | (high << 4)) - np.int8(32)
            out[n, p] = (d[n] * np.float32(np.int8(blocks[n, 192 + p // 16]))) * np.float32(q)


def dequantize_cpu(data: torch.Tensor | np.ndarray, ggml_type: GGMLType, rows: int, columns: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [rows * row_bytes] (one matrix as the file stores it) -> float32 [rows, columns], on the CPU;
    written into ``out`` (a contiguous float32 CPU tensor of that shape) when given."""
    raw = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    raw = raw.reshape(-1).view(np.uint8)
    name = ggml_type.name
    if out is None:
        out = torch.empty(rows, columns, dtype=torch.float32)
    if name in ("F32", "F16", "BF16"):
        return out.copy_(dequantize(torch.from_numpy(raw.copy()), ggml_type, rows, columns))
    blocks = raw.reshape(-1, ggml_type.nbytes)                              # [N, nbytes]
    result = out
    out = out.numpy().reshape(blocks.shape[0], ggml_type.block)            # [N, B] the same memory
    scales = [_halves(blocks, at) for at in _SCALE_AT[name]]
    if name == "Q8_0":
        _q8_0(blocks, scales[0], out)
    elif name == "Q4_0":
        _q4_0(blocks, scales[0], out)
    elif name in ("Q4_K", "Q5_K"):
        _q45_k(blocks, scales[0], scales[1], name == "Q5_K", out)
    else:
        _q6_k(blocks, scales[0], out)
    return result
