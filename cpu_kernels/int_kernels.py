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
weights are widened; ``np.int32(acc + ...)`` keeps the sum 32-bit. An int4 byte's high nibble stays in
place (byte & 0xF0: 16x the code, every product still within int16) and the block's high sum is shifted
down once, so the loop never leaves 16-bit lanes. A row whose width is not a multiple of B ends in a short
block run by its own function, called from outside the block loop (a branch to it inside made LLVM
compile the loop 1.3-1.5x slower). Numba 0.68 (LLVM 22), ``inspect_asm`` of int_ffn:
  AVX-512 VNNI host (znver4): int8 rows ``vpmovsxbw`` + ``vpmaddwd``/``vpdpwssd`` (int16 pairs
    multiplied and added into int32 lanes) on ymm; int4 rows ``vpmovzxbw`` + ``vpand`` (both nibbles),
    then ``vpmaddwd`` + ``vpdpwssd``; no shifts or narrowing in the loop.
  AVX2 (NUMBA_CPU_NAME=haswell): int8 rows ``vpmovsxbw`` + ``vpmaddwd`` + ``vpaddd`` on ymm; int4 rows
    ``vpmovzxbw`` + ``vpand``, ``vpmaddwd`` + ``vpaddd``.
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
    """sum over the full blocks b of xs[b] * (q[r] . xq over block b), int32 inside a block. They loop a
    constant ACT_BLOCK times, which LLVM vectorizes without a remainder (a run-time count of 64 would
    run its scalar remainder loop). A short last block is the caller's (_q8_short_block): a branch to it
    in here makes LLVM compile the block loop about 1.5x slower."""
    width = q.shape[1]
    full = width // ACT_BLOCK
    acc = np.float32(0.0)
    for b in range(full):
        k0 = b * ACT_BLOCK
        s = np.int32(0)
        for k in range(ACT_BLOCK):
            s = np.int32(s + np.int32(q[r, k0 + k]) * np.int32(xq[k0 + k]))
        acc += np.float32(s) * xs[b]
    return acc


@njit(inline="never", **_OPTS)
def _q8_short_block(q, r, xq, xs):
    """The short last block of an int8 row (0 when K is a multiple of ACT_BLOCK)."""
    b = q.shape[1] // ACT_BLOCK
    if b == xs.size:
        return np.float32(0.0)
    s = np.int32(0)
    for k in range(b * ACT_BLOCK, q.shape[1]):
        s = np.int32(s + np.int32(q[r, k]) * np.int32(xq[k]))
    return np.float32(s) * xs[b]


@njit(**_OPTS)
def _q4_row(q, scale, zero, group, r, xe, xo, xs, xsum):
    """Row r of an int4 matrix (q uint8 [R, K/2], float16-bit scale/zero [R, K/G]) against the quantized
    activation's even inputs xe [K/2] and odd ones xo [K/2]: low nibbles meet xe, high ones xo. Per block:
    int32 sum of low * xe[j] + high * xo[j] (blocks as in _q8_row; two arrays, not one indexed at
    half + j, whose possibly negative index numba wraps element by element). The high nibble is kept in
    place (byte & 0xF0, 16x its value, so every product fits int16) and its sum shifted down once per
    block: the loop then stays in 16-bit lanes (no widening to int32 and back for the shift). Full blocks
    only; a short last block is the caller's (_q4_short_block), as in _q8_row."""
    half = q.shape[1]
    full = half // HALF_BLOCK
    per_group = group // ACT_BLOCK
    acc = np.float32(0.0)
    g, in_group = 0, 0                          # the block's group, counted (a division per block is slow)
    for b in range(full):
        j0 = b * HALF_BLOCK
        lo = np.int32(0)
        hi = np.int32(0)
        for j in range(HALF_BLOCK):
            byte = np.int16(q[r, j0 + j])
            lo = np.int32(lo + np.int32(np.int16(byte & 15) * xe[j0 + j]))
            hi = np.int32(hi + np.int32(np.int16(byte & 240) * xo[j0 + j]))
        acc += _q4_block_value(scale, zero, r, g, np.int32(lo + (hi >> 4)), xs[b], xsum[b])
        in_group += 1
        if in_group == per_group:
            g, in_group = g + 1, 0
    return acc


@njit(inline="never", **_OPTS)
def _q4_short_block(q, scale, zero, group, r, xe, xo, xs, xsum):
    """The short last block of an int4 row (0 when K is a multiple of ACT_BLOCK)."""
    b = q.shape[1] // HALF_BLOCK
    if b == xs.size:
        return np.float32(0.0)
    lo = np.int32(0)
    hi = np.int32(0)
    for j in range(b * HALF_BLOCK, q.shape[1]):
        byte = np.int16(q[r, j])
        lo = np.int32(lo + np.int32(np.int16(byte & 15) * xe[j]))
        hi = np.int32(hi + np.int32(np.int16(byte & 240) * xo[j]))
    return _q4_block_value(scale, zero, r, b // (group // ACT_BLOCK), np.int32(lo + (hi >> 4)), xs[b], xsum[b])


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
        def q8(mat, r, xq, xs, xsum):
            short = _q8_short_block(mat[0], r, xq, xs) if mat[0].shape[1] % ACT_BLOCK else np.float32(0.0)
            return (_q8_row(mat[0], r, xq, xs) + short) * mat[1][r]
        return q8

    def q4(mat, r, xq, xs, xsum):
        half = mat[0].shape[1]
        short = _q4_short_block(mat[0], mat[1], mat[2], mat[3], r, xq[:half], xq[half:], xs, xsum) \
            if half % HALF_BLOCK else np.float32(0.0)
        return _q4_row(mat[0], mat[1], mat[2], mat[3], r, xq[:half], xq[half:], xs, xsum) + short
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
