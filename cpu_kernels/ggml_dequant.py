"""GGML blocks on the CPU: Numba block decoders, the parallel dequantization built on them, and a fused
dequantize-and-multiply for GGUF experts.

    # N = blocks, B = values per block (32 or 256), R = rows, K = columns, T = tokens

The block layouts are ``ggml_blocks``' (its docstring draws them). ``_decode`` widens one block to B
float32 values with the float32 operations of ``ggml_blocks.dequantize`` in the same order (compiled
without fast-math, so nothing is fused or reordered): the same values, bit for bit, as the torch version
the device runs and as the ``gguf`` package's. Two kernels use it:

- ``dequantize_cpu``: a whole matrix to float32 on every core (a GGUF's dense tensors on read).
- ``gguf_matmul``: out [T, R] = x [T, K] @ W.T with each block decoded into a small buffer and consumed
  at once, so a decode step reads the file's bytes once and never writes the float32 matrix (the
  dequantize-then-matmul path writes and re-reads 4 bytes per weight). The weights are the decoded
  values above; only the summation order differs from a float32 matmul of the dequantized matrix
  (the dot products may be reassociated to vectorize).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .activations import activate
from .formats import _f16_bits_to_f32
from .ggml_blocks import GGMLType, dequantize

# Kernel codes of the block types, and values / bytes per block.
KINDS = {"Q8_0": 0, "Q4_0": 1, "Q4_K": 2, "Q5_K": 3, "Q6_K": 4}


@numba.njit(inline="always")
def _f16(w, at):
    """The little-endian float16 at byte ``at`` of ``w`` as float32."""
    return _f16_bits_to_f32(np.int16(np.uint16(w[at]) | (np.uint16(w[at + 1]) << np.uint16(8))))


@numba.njit(inline="always")
def _scale_min_k4(w, base, s):
    """Sub-block ``s``'s 6-bit scale and min of the Q4_K / Q5_K block at ``base`` (packed in bytes 4..15)."""
    if s < 4:
        return w[base + 4 + s] & 0x3F, w[base + 8 + s] & 0x3F
    sc = (w[base + 8 + s] & 0x0F) | ((w[base + s] >> 2) & 0x30)
    mn = (w[base + 8 + s] >> 4) | ((w[base + 4 + s] >> 2) & 0x30)
    return sc, mn


@numba.njit(inline="always")
def _high_nibble(byte):
    """floor(byte / 16) of a byte held as a float32, exact. The decoders take nibbles (and Q6_K's 2-bit fields)
    in float32 arithmetic on exact integers: numba widens integer shifts of bytes to int64, which kept
    these loops scalar (1.8x slower on a Q4_K matrix)."""
    return np.floor(byte * np.float32(0.0625))


@numba.njit(inline="always")
def _low_nibble(byte):
    """byte mod 16 of a byte held as a float32, exact (see _high_nibble)."""
    return byte - np.float32(16.0) * _high_nibble(byte)


@numba.njit(nogil=True, cache=True)
def _decode(kind, w, base, vals):
    """vals[:B] = the float32 values of the block of type ``kind`` starting at byte ``base`` of ``w``."""
    if kind == 0:                                           # Q8_0: d | q int8 [32]
        d = _f16(w, base)
        for j in range(32):
            vals[j] = np.float32(np.int8(w[base + 2 + j])) * d
    elif kind == 1:                                         # Q4_0: d | 16 bytes of two nibbles
        d = _f16(w, base)
        codes = w[base + 2: base + 18]
        for j in range(16):
            byte = np.float32(codes[j])
            vals[j] = d * (_low_nibble(byte) - np.float32(8.0))
            vals[j + 16] = d * (_high_nibble(byte) - np.float32(8.0))
    elif kind == 2:                                         # Q4_K
        d, dmin = _f16(w, base), _f16(w, base + 2)
        for s in range(8):
            sc, mn = _scale_min_k4(w, base, s)
            scale = d * np.float32(sc)
            offset = dmin * np.float32(mn)
            codes = w[base + 16 + (s >> 1) * 32: base + 48 + (s >> 1) * 32]     # [32] the sub-block's bytes
            out = vals[s * 32: s * 32 + 32]
            if s & 1:
                for i in range(32):
                    out[i] = scale * _high_nibble(np.float32(codes[i])) - offset
            else:
                for i in range(32):
                    out[i] = scale * _low_nibble(np.float32(codes[i])) - offset
    elif kind == 3:                                         # Q5_K
        d, dmin = _f16(w, base), _f16(w, base + 2)
        codes = base + 48
        for s in range(8):
            sc, mn = _scale_min_k4(w, base, s)
            scale = d * np.float32(sc)
            offset = dmin * np.float32(mn)
            shift = 4 * (s & 1)
            for i in range(32):
                q = (w[codes + (s >> 1) * 32 + i] >> shift) & 15
                q |= ((w[base + 16 + i] >> s) & 1) << 4
                vals[s * 32 + i] = scale * np.float32(q) - offset
    else:                                                   # Q6_K: ql [128] | qh [64] | scales int8 [16] | d
        d = _f16(w, base + 208)
        for half in range(2):
            for j in range(4):                              # value p = 128 half + 32 j + i
                low_at, at = base + half * 64 + (j % 2) * 32, half * 128 + j * 32
                lows, highs = w[low_at: low_at + 32], w[base + 128 + half * 32: base + 160 + half * 32]
                step, above = np.float32(0.25 ** j), np.float32(0.25 ** (j + 1))   # high field: bits 2j, 2j+1
                for part in range(2):                       # 16 values share a scale
                    scale = d * np.float32(np.int8(w[base + 192 + (at + 16 * part) // 16]))
                    out = vals[at + 16 * part: at + 16 * part + 16]
                    for i in range(16):
                        byte = np.float32(lows[16 * part + i])
                        low = _high_nibble(byte) if j >= 2 else _low_nibble(byte)
                        bits = np.float32(highs[16 * part + i])
                        high = np.floor(bits * step) - np.float32(4.0) * np.floor(bits * above)
                        out[i] = scale * (low + np.float32(16.0) * high - np.float32(32.0))


@numba.njit(parallel=True, nogil=True, cache=True)
def _dequantize(kind, w, nbytes, out):
    """out [N, B] = every block of ``w`` (N blocks of ``nbytes``) widened."""
    for n in numba.prange(out.shape[0]):
        _decode(kind, w, n * nbytes, out[n])


def _flat_bytes(data: torch.Tensor | np.ndarray) -> np.ndarray:
    raw = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    return np.ascontiguousarray(raw.reshape(-1)).view(np.uint8)


def dequantize_cpu(data: torch.Tensor | np.ndarray, ggml_type: GGMLType, rows: int, columns: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [rows * row_bytes] (one matrix as the file stores it) -> float32 [rows, columns], on the CPU;
    written into ``out`` (a contiguous float32 CPU tensor of that shape) when given."""
    raw = _flat_bytes(data)
    if out is None:
        out = torch.empty(rows, columns, dtype=torch.float32)
    if ggml_type.name not in KINDS:
        return out.copy_(dequantize(torch.from_numpy(raw.copy()), ggml_type, rows, columns))
    blocks = out.numpy().reshape(-1, ggml_type.block)                       # [N, B] the same memory
    _dequantize(KINDS[ggml_type.name], raw, ggml_type.nbytes, blocks)
    return out


ROWS_PER_TASK = 8       # rows one parallel task multiplies (their blocks decoded one at a time)


@numba.njit(parallel=True, nogil=True, fastmath={"reassoc", "nsz"}, cache=True)
def _matmul(kind, w, rows, columns, block, nbytes, x, out):
    tokens = x.shape[0]
    per_row = columns // block
    for task in numba.prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        vals = np.empty(block, np.float32)
        acc = np.empty(tokens, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0.0
            for b in range(per_row):
                _decode(kind, w, (r * per_row + b) * nbytes, vals)
                col = b * block
                for t in range(tokens):
                    s = np.float32(0.0)
                    for j in range(block):
                        s += vals[j] * x[t, col + j]
                    acc[t] += s
            for t in range(tokens):
                out[t, r] = acc[t]


def gguf_matmul(x: np.ndarray, data: np.ndarray, ggml_type: GGMLType, rows: int, out: np.ndarray) -> np.ndarray:
    """out [T, rows] = x [T, K] @ W.T for W [rows, K] stored as ``data`` (uint8, the file's bytes of
    type ``ggml_type``); x and out float32, C-contiguous."""
    columns = x.shape[1]
    if data.size != rows * ggml_type.row_bytes(columns):
        raise ValueError(f"{ggml_type.name} matrix of {rows} x {columns} needs {rows * ggml_type.row_bytes(columns)} "
                         f"bytes, got {data.size}")
    _matmul(KINDS[ggml_type.name], data, rows, columns, ggml_type.block, ggml_type.nbytes, x, out)
    return out


@numba.njit(parallel=True, nogil=True, cache=True)
def _gate(g, u, code):
    """g [T, I] = act(g) * u, in place."""
    for t in range(g.shape[0]):
        for i in numba.prange(g.shape[1]):
            g[t, i] = activate(g[t, i], code) * u[t, i]


def gguf_ffn(x: np.ndarray, gate: tuple, up: tuple, down: tuple, code: int, out: np.ndarray,
             scratch: np.ndarray) -> np.ndarray:
    """out [T, H] = down @ (act(gate @ x) * (up @ x)) for x [T, H]; ``gate``/``up``/``down``: (bytes uint8,
    GGMLType, rows) of the file's matrices ([I, H], [I, H], [H, I]); scratch float32 >= 2 T I floats."""
    tokens, inter = x.shape[0], gate[2]
    flat = scratch.reshape(-1)
    if flat.size < 2 * tokens * inter:
        raise ValueError(f"scratch holds {flat.size} floats; a GGUF expert needs {2 * tokens * inter}")
    g = flat[: tokens * inter].reshape(tokens, inter)                        # [T, I]
    u = flat[tokens * inter: 2 * tokens * inter].reshape(tokens, inter)      # [T, I]
    gguf_matmul(x, *gate, g)
    gguf_matmul(x, *up, u)
    _gate(g, u, code)
    return gguf_matmul(g, *down, out)
