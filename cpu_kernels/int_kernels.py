"""Integer-dot kernels of the activation-quantized packed formats (int8-a8, int4-a8, int4-g128-a8).

    # T = tokens, H = hidden, I = intermediate, K = a projection's input width, B = ACT_BLOCK (64)
    x [T, H] float32 -> xq [T, H] (int8 codes held as int16), xs [T, H/B]   (act_quant.quantize_rows)
    h [t, j] = act(gate_j . x[t]) * (up_j . x[t])          # [T, I]
    h -> hq, hs ; out[t, r] = down_r . h[t]                # [T, H]
    row . x over one block b = xs[b] * (int32 sum over the block)   (int8 rows: times the row's scale)
      int8 rows   sum_k q[k] * xq[k]
      int4 rows   scale[g] * (sum_k code[k] * xq[k] - zero[g] * sum_k xq[k])   (g: the block's group)

Hot loop: one int32 reduction per block of B inputs, over a constant trip count (a run-time count of
64 would run LLVM's scalar remainder loop), with the activation codes stored as int16 so that only the
weights are widened; ``np.int32(acc + ...)`` keeps the sum 32-bit. Numba 0.68 (LLVM 22), ``inspect_asm``:
  AVX-512 VNNI host (znver4): int8 rows ``vpmovsxbw`` + ``vpmaddwd`` and ``vpdpwssd`` (int16 pairs
    multiplied and added into int32 lanes) on ymm; int4 rows ``vpmovzxbw``/``vpand`` (low nibbles) and
    ``vpsrld`` + ``vpmovdw`` (high nibbles), then ``vpmaddwd`` + ``vpdpwssd``.
  AVX2 (NUMBA_CPU_NAME=haswell): int8 rows ``vpmovsxbw`` + ``vpmaddwd`` + ``vpaddd`` on ymm; int4 rows
    ``vpand``/``vpsrld`` for the nibbles, ``vpmovzxbw``, ``vpmaddwd``.
LLVM forms neither ``vpdpbusd`` nor ``vpmaddubsw`` here (it cannot prove the uint8 x int8 pair sums stay
within int16); the int16 forms do two multiply-adds per int32 lane.
Rows are split over threads (prange); each row serves every token while it is in L1, so the weights
are read from memory once per call at any T. Nothing is allocated.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .act_quant import ACT_BLOCK, quantize_rows
from .activations import activate
from .formats import _f16_bits_to_f32
from .kernels import _OPTS

HALF_BLOCK = ACT_BLOCK // 2   # int4 bytes per activation block


@njit(**_OPTS)
def _q8_row(q, r, xq, xs):
    """sum over blocks of xs[b] * (q[r] . xq over block b), int32 inside a block. Full blocks loop a
    constant ACT_BLOCK times, which LLVM vectorizes without a remainder (a run-time count of 64 would
    run its scalar remainder loop); a short last block runs the plain loop."""
    width = q.shape[1]
    full = width // ACT_BLOCK
    acc = np.float32(0.0)
    for b in range(full):
        k0 = b * ACT_BLOCK
        s = np.int32(0)
        for k in range(ACT_BLOCK):
            s = np.int32(s + np.int32(q[r, k0 + k]) * np.int32(xq[k0 + k]))
        acc += np.float32(s) * xs[b]
    if full < xs.size:
        s = np.int32(0)
        for k in range(full * ACT_BLOCK, width):
            s = np.int32(s + np.int32(q[r, k]) * np.int32(xq[k]))
        acc += np.float32(s) * xs[full]
    return acc


@njit(**_OPTS)
def _q4_row(q, scale, zero, group, r, xe, xo, xs, xsum):
    """Row r of an int4 matrix (q uint8 [R, K/2], float16-bit scale/zero [R, K/G]) against the quantized
    activation's even inputs xe [K/2] and odd ones xo [K/2]: low nibbles meet xe, high ones xo. Per block:
    int32 sum of low * xe[j] + high * xo[j] (blocks as in _q8_row; two arrays, not one indexed at
    half + j, whose possibly negative index numba wraps element by element)."""
    half = q.shape[1]
    full = half // HALF_BLOCK
    per_group = group // ACT_BLOCK
    acc = np.float32(0.0)
    g, in_group = 0, 0                          # the block's group, counted (a division per block is slow)
    for b in range(full):
        j0 = b * HALF_BLOCK
        s = np.int32(0)
        for j in range(HALF_BLOCK):
            byte = np.int32(q[r, j0 + j])
            s = np.int32(s + (byte & 15) * np.int32(xe[j0 + j]) + (byte >> 4) * np.int32(xo[j0 + j]))
        acc += _q4_block_value(scale, zero, r, g, s, xs[b], xsum[b])
        in_group += 1
        if in_group == per_group:
            g, in_group = g + 1, 0
    if full < xs.size:
        s = np.int32(0)
        for j in range(full * HALF_BLOCK, half):
            byte = np.int32(q[r, j])
            s = np.int32(s + (byte & 15) * np.int32(xe[j]) + (byte >> 4) * np.int32(xo[j]))
        acc += _q4_block_value(scale, zero, r, g, s, xs[full], xsum[full])
    return acc


@njit(inline="always", **_OPTS)
def _q4_block_value(scale, zero, r, g, s, xscale, xsum):
    """One block's term: xscale * scale[g] * (s - zero[g] * xsum) (float16-bit scale and zero)."""
    return xscale * _f16_bits_to_f32(scale[r, g]) * (np.float32(s) - _f16_bits_to_f32(zero[r, g]) * np.float32(xsum))


def int_row(mat, r, xq, xs, xsum):
    """Row r of a packed matrix . the quantized activation (numba only; dispatches on the matrix's tuple)."""
    raise NotImplementedError("int_row is only callable from numba-compiled code")


@overload(int_row, inline="always")
def _int_row_overload(mat, r, xq, xs, xsum):
    """int8: (q int8 [R, K], scale float32 [R]); int4: (q uint8 [R, K/2], scale, zero int16 [R, NG], G)."""
    if not isinstance(mat, types.BaseTuple):
        return None
    if len(mat) == 2:
        return lambda mat, r, xq, xs, xsum: _q8_row(mat[0], r, xq, xs) * mat[1][r]

    def q4(mat, r, xq, xs, xsum):
        half = mat[0].shape[1]
        return _q4_row(mat[0], mat[1], mat[2], mat[3], r, xq[:half], xq[half:], xs, xsum)
    return q4


def deinterleaves(mat):
    """Whether a matrix's kernel reads activations deinterleaved (int4) (numba only)."""
    raise NotImplementedError("deinterleaves is only callable from numba-compiled code")


@overload(deinterleaves, inline="always")
def _deinterleaves_overload(mat):
    if not isinstance(mat, types.BaseTuple):
        return None
    flag = len(mat) != 2
    return lambda mat: flag


@njit(parallel=True, **_OPTS)
def int_ffn(x, gate_up, down, act, out, h, xq, hq):
    """T tokens: x [T, H] float32, out [T, H]; scratch h [T, I] float32, xq = (codes int16 [T, H], scale [T, NBH],
    qsum int32 [T, NBH]) and hq the same for h ([T, I], [T, NBI])."""
    tokens, hidden, inter = x.shape[0], out.shape[1], h.shape[1]
    xcodes, xscale, xsum = xq
    hcodes, hscale, hsum = hq
    quantize_rows(x, xcodes, xscale, xsum, deinterleaves(gate_up))
    for j in prange(inter):
        for t in range(tokens):
            g = int_row(gate_up, j, xcodes[t], xscale[t], xsum[t])
            u = int_row(gate_up, inter + j, xcodes[t], xscale[t], xsum[t])
            h[t, j] = activate(g, act) * u
    quantize_rows(h, hcodes, hscale, hsum, deinterleaves(down))
    for r in prange(hidden):
        for t in range(tokens):
            out[t, r] = int_row(down, r, hcodes[t], hscale[t], hsum[t])
