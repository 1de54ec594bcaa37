"""Integer-dot kernels of the activation-quantized packed formats (int8-a8, int4-a8, int4-g128-a8).

    # T = tokens, H = hidden, I = intermediate, K = a projection's input width, B = ACT_BLOCK (64)
    x [T, H] float32 -> xq [T, H] (int8 codes held as int16), xs [T, H/B]   (act_quant.quantize_rows)
    h [t, j] = act(gate_j . x[t]) * (up_j . x[t])          # [T, I]
    h -> hq, hs ; out[t, r] = down_r . h[t]                # [T, H]
    row . x over one block b = xs[b] * (int32 sum over the block)   (int8 rows: times the row's scale)
      int8 rows   sum_k q[k] * xq[k]
      int4 rows   scale[g] * (sum_k code[k] * xq[k] - zero[g] * sum_k xq[k])   (g: the block's group)

Hot loop (simd.py, explicit LLVM vector IR): per block of B inputs the weights widen to int16, meet the
int16 activation codes in ``pmaddwd`` pairs (exact int32 lanes), and the 16 int32 lanes are converted and
accumulated times the block's scale into 16 float32 lanes; one horizontal sum per row. Instructions per
target are listed in simd.py (AVX-512 BW: ``vpmovsxbw``/``vpmovzxbw`` zmm + ``vpmaddwd``/``vpdpwssd``;
AVX2: the same on ymm). This replaced a scalar loop that LLVM vectorized with one horizontal int32
reduction per block: 1.5-1.8x faster per thread at H=1024 / I=3584 (int4 18 -> 31 GMAC/s, int8 27 ->
50, one thread, weights in cache, znver4). The short last block of a row whose width is not a multiple
of B runs the same vector body on zero-padded stack copies (a call to a separate scalar function there
cost 25% of the row loop even when never taken).
Rows are split over threads (prange); each row serves every token while it is in L1, so the weights
are read from memory once per call at any T. Nothing is allocated.
"""

from __future__ import annotations

from numba import njit, prange, types
from numba.core.errors import TypingError
from numba.extending import overload

from .act_quant import ACT_BLOCK, quantize_rows
from .activations import activate
from .kernels import _OPTS
from .simd import q4_blocks_dot, q4_full_blocks_dot, q8_blocks_dot, q8_full_blocks_dot


@njit(**_OPTS)
def _group_shift(group):
    """log2(group / ACT_BLOCK): int4 groups are ACT_BLOCK times a power of two (packed_ffn.packed_matrices)."""
    shift = 0
    while (ACT_BLOCK << shift) < group:
        shift += 1
    return shift


def int_row(mat, r, xq, xs, xsum, tail):
    """Row r of a packed matrix . the quantized activation (numba only; dispatches on the matrix's tuple).
    ``tail``: whether the rows end in a short block (K % ACT_BLOCK != 0); a literal picks one compiled block
    dot (the one with a short block costs the int4 row loop about 25% when merely present)."""
    raise NotImplementedError("int_row is only callable from numba-compiled code")


@overload(int_row, inline="always")
def _int_row_overload(mat, r, xq, xs, xsum, tail):
    """int8: (q int8 [R, K], scale float32 [R]); int4: (q uint8 [R, K/2], scale, zero int16 [R, NG], G)."""
    if not isinstance(mat, types.BaseTuple):
        return None
    if not isinstance(tail, types.BooleanLiteral):
        raise TypingError("int_row needs a literal tail flag (True or False in the call)")
    if len(mat) == 2:
        dot8 = q8_blocks_dot if tail.literal_value else q8_full_blocks_dot

        def q8(mat, r, xq, xs, xsum, tail):
            return dot8(mat[0], r, xq, xs) * mat[1][r]
        return q8
    dot4 = q4_blocks_dot if tail.literal_value else q4_full_blocks_dot

    def q4(mat, r, xq, xs, xsum, tail):
        return dot4(mat[0], r, mat[1], mat[2], _group_shift(mat[3]), xq, xs, xsum)
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
    qsum int32 [T, NBH]) and hq the same for h ([T, I], [T, NBI]). Each row loop is written twice, for rows
    with and without a short last block, so that the branch is taken once per call (int_row)."""
    tokens, hidden, inter = x.shape[0], out.shape[1], h.shape[1]
    xcodes, xscale, xsum = xq
    hcodes, hscale, hsum = hq
    quantize_rows(x, xcodes, xscale, xsum, deinterleaves(gate_up))
    if hidden % ACT_BLOCK:
        for j in prange(inter):
            for t in range(tokens):
                g = int_row(gate_up, j, xcodes[t], xscale[t], xsum[t], True)
                h[t, j] = activate(g, act) * int_row(gate_up, inter + j, xcodes[t], xscale[t], xsum[t], True)
    else:
        for j in prange(inter):
            for t in range(tokens):
                g = int_row(gate_up, j, xcodes[t], xscale[t], xsum[t], False)
                h[t, j] = activate(g, act) * int_row(gate_up, inter + j, xcodes[t], xscale[t], xsum[t], False)
    quantize_rows(h, hcodes, hscale, hsum, deinterleaves(down))
    if inter % ACT_BLOCK:
        for r in prange(hidden):
            for t in range(tokens):
                out[t, r] = int_row(down, r, hcodes[t], hscale[t], hsum[t], True)
    else:
        for r in prange(hidden):
            for t in range(tokens):
                out[t, r] = int_row(down, r, hcodes[t], hscale[t], hsum[t], False)
