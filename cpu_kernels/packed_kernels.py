"""Numba kernels of one gated expert FFN read straight from a packed int4 or fp8 row.

    # T = tokens, H = hidden, I = intermediate, G = int4 group, B = FP8 block (128), C = row chunks
    h = act(gate @ x) * (up @ x)   # [T, I]      gate = gate_up rows 0..I-1, up = rows I..2I-1
    y = down @ h                   # [T, H]

The layouts are ExpertFormat's (cpu_kernels/packed.py); each matrix arrives as a tuple of its
numpy views, the float16 ones as int16 bits (numba has no CPU float16; `_f16_bits_to_f32`
widens them):

    int4  (q uint8 [R, K/2], scale int16 [R, ceil(K/G)], zero int16 [same], G)
          W[r, c] = (q[r, c] - zero[r, c // G]) * scale[r, c // G], two codes per byte (low nibble first)
    fp8   (q uint8 [R, K], scale float32 [row blocks, ceil(K/B)], split)
          W[r, c] = fp8(q[r, c]) * scale[block_row(r), c // B]; rows below `split` and from `split` on
          are blocked separately (gate_up: split = I, so gate and up each start a block row; down: H)

Rows are split into C contiguous chunks, one prange iteration each. A chunk decodes one weight row
(or a gate/up or down row pair) at a time into its own float32 row buffer `rows[c]` (K floats,
so it stays in L1/L2), then runs kernels.py's float32 dot products on it:

  * decode (T = 1): each packed byte is read once from memory and each decoded row once from cache;
  * prefill (T > 1): a decoded row pair serves all tokens, TOKEN_BLOCK at a time, so the packed
    expert is still read once per call.

Decoding a whole row first lets both paths share kernels.py's long float32 dot products (a fused
per-group reduction measured ~20% faster for int4 at T = 1 only). Group and block loops run in
whole INT4_CHUNK / B steps, whose constant trip counts LLVM vectorizes; int4 rows decode into their
even columns, then their odd ones, with x and h reordered to match (kernel_input), since
interleaved stores vectorize poorly; fp8 decodes with integer ops and selects, not a table lookup
(a gather per weight, 3x slower). Decoding dominates: on a 2-core AVX-512 CPU an int4 or fp8 expert
is compute-bound at T = 1. Accumulation is float32; nothing is allocated.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from .act_quant import ACT_BLOCK, Q_MAX
from .activations import activate
from .formats import _bf16_bits_to_f32, _f16_bits_to_f32, _f32_bits, widen
from .int_kernels import _group_shift
from .kernels import _OPTS, TOKEN_BLOCK, _dot1, _dot2x1, _dot2x4
from .packed import FP8_BLOCK
from .simd import LANES as FP8_STEP
from .simd import (
    fp8_blocks_dot,
    fp8_full_blocks_dot,
    int4_dequant_full_row,
    int4_dequant_row,
    q4f_blocks_dot,
    q4f_full_blocks_dot,
)

# Bytes (2 * INT4_CHUNK weights) per vectorized int4 decode step; groups of 64 or more columns are a multiple of it.
INT4_CHUNK = 32
# ... and the step of groups of 32 columns (16 bytes); every int4 group size is a multiple of 2 * INT4_SMALL_CHUNK.
INT4_SMALL_CHUNK = 16
# float8_e4m3fn bit pattern -> float32 value (the two NaN codes stay NaN): the decode's definition and test oracle.
FP8_LUT = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
# fp8 decode: the high 16 bits of a normal value's float32 are (magnitude bits << 4) + FP8_BIAS (exponent 7 -> 127);
# subnormals (exponent 0) are mantissa * 2^-9.
FP8_BIAS = np.int32(120 << 7)
FP8_SUBNORMAL = np.float32(2.0**-9)


@njit(inline="always", **_OPTS)
def _int4_decode_bytes(q, r, j0, j1, zero, scale, low, high):
    """low[j], high[j] = (low, high nibble of q[r, j] - zero) * scale for bytes j0..j1-1."""
    offset = -zero * scale
    for j in range(j0, j1):
        b = np.int32(q[r, j])   # int32, not numba's default int64: int64 -> float32 does not vectorize
        low[j] = np.float32(b & 15) * scale + offset
        high[j] = np.float32(b >> 4) * scale + offset


@njit(inline="always", **_OPTS)
def _int4_decode_chunks(q, scale, zero, r, low, high, chunk, per_group):
    """low/high[:K/2] = row r's even and odd columns, ``chunk`` bytes at a time (a chunk never straddles two
    groups; ``per_group`` chunks per group), then the bytes left in a short last group. Inlined with a
    constant ``chunk``: one flat loop of constant-trip chunks, which LLVM vectorizes."""
    width = q.shape[1]
    full = width // chunk
    for k in range(full):
        g = k // per_group
        j = k * chunk
        _int4_decode_bytes(q, r, j, j + chunk, _f16_bits_to_f32(zero[r, g]), _f16_bits_to_f32(scale[r, g]),
                           low, high)
    g = full // per_group
    if full * chunk < width:
        _int4_decode_bytes(q, r, full * chunk, width, _f16_bits_to_f32(zero[r, g]),
                           _f16_bits_to_f32(scale[r, g]), low, high)


@njit(**_OPTS)
def _int4_decode_row(q, scale, zero, group, r, w):
    """w[:K] = row r of an int4 matrix in deinterleaved column order (even columns, then odd ones: see
    kernel_input), INT4_CHUNK bytes at a time (INT4_SMALL_CHUNK for groups of 32 columns). Constant-trip
    chunks in one flat loop: LLVM vectorizes these, but not the same chunks nested in a loop over groups of
    run-time size; two separate outputs, not interleaved stores."""
    width = q.shape[1]
    low, high = w[:width], w[width:2 * width]
    if group % (2 * INT4_CHUNK):
        _int4_decode_chunks(q, scale, zero, r, low, high, INT4_SMALL_CHUNK, group // (2 * INT4_SMALL_CHUNK))
    else:
        _int4_decode_chunks(q, scale, zero, r, low, high, INT4_CHUNK, group // (2 * INT4_CHUNK))


@njit(inline="always", **_OPTS)
def _fp8_decode_cols(q, r, c0, c1, scale, w):
    """w[c] = FP8_LUT[q[r, c]] * scale for columns c0..c1-1, computed with integer ops and selects, which
    vectorize (a table lookup is a gather per weight: 7x slower on AVX-512)."""
    for c in range(c0, c1):
        b = np.int32(q[r, c])
        mag = b & 127
        v = _bf16_bits_to_f32(np.uint16((mag << 4) + FP8_BIAS))
        if mag < 8:
            v = np.float32(mag) * FP8_SUBNORMAL
        if mag == 127:
            v = np.float32(np.nan)
        if b >= 128:
            v = -v
        w[c] = v * scale


@njit(inline="always", **_OPTS)
def _fp8_block_row(r, split):
    """Row r's row of scale blocks (packed.py's block_row: rows below and from ``split`` blocked apart)."""
    return (r // split) * ((split + FP8_BLOCK - 1) // FP8_BLOCK) + (r % split) // FP8_BLOCK


@njit(**_OPTS)
def _fp8_decode_row(q, scale, split, r, w):
    """w[:K] = row r of an fp8 matrix, block by block (the last block may be short)."""
    width = q.shape[1]
    br = _fp8_block_row(r, split)
    for b in range(scale.shape[1]):
        c0 = b * FP8_BLOCK
        if c0 + FP8_BLOCK <= width:
            _fp8_decode_cols(q, r, c0, c0 + FP8_BLOCK, scale[br, b], w)
        else:
            _fp8_decode_cols(q, r, c0, width, scale[br, b], w)


def decode_row(mat, r, w):
    """w[:K] = row r of a packed matrix as float32 (numba only; dispatches on the matrix's types)."""
    raise NotImplementedError("decode_row is only callable from numba-compiled code")


@overload(decode_row, inline="always")
def _decode_row_overload(mat, row, w):
    """int4 matrices carry int16 (float16 bits) scales, fp8 ones float32. The tuple is unpacked here:
    arrays read out of a tuple in memory may alias the stores to w, which stops LLVM vectorizing."""
    if not isinstance(mat, types.BaseTuple):
        return None
    if mat[1].dtype == types.int16:
        return lambda mat, row, w: _int4_decode_row(mat[0], mat[1], mat[2], mat[3], row, w)
    return lambda mat, row, w: _fp8_decode_row(mat[0], mat[1], mat[2], row, w)


def kernel_input(mat, src, dst):
    """The tokens [T, K] in the column order decode_row writes a row of ``mat`` in (numba only)."""
    raise NotImplementedError("kernel_input is only callable from numba-compiled code")


@overload(kernel_input)
def _kernel_input_overload(mat, src, dst):
    """int4 rows decode even columns (low nibbles) then odd ones: dst [T, K] gets src in that order.
    fp8 rows decode in order: src itself."""
    if not isinstance(mat, types.BaseTuple):
        return None
    if mat[1].dtype == types.int16:
        def deinterleave(mat, src, dst):
            half = src.shape[1] // 2
            for t in range(src.shape[0]):
                for j in range(half):
                    dst[t, j] = src[t, 2 * j]
                    dst[t, half + j] = src[t, 2 * j + 1]
            return dst
        return deinterleave
    return lambda mat, src, dst: src


@njit(inline="always", **_OPTS)
def _decode_pair(mat, ra, rb, w, width):
    """Rows ra, rb of a packed matrix decoded into w[:width] and w[width:2 * width]; returns both views."""
    wa, wb = w[:width], w[width:2 * width]
    decode_row(mat, ra, wa)
    decode_row(mat, rb, wb)
    return wa, wb


@njit(**_OPTS)
def _chunk(c, chunks, n):
    """Rows [start, stop) of chunk c when n rows are split into `chunks` contiguous chunks."""
    return c * n // chunks, (c + 1) * n // chunks


@njit(parallel=True, **_OPTS)
def packed_decode(x, gate_up, down, act, out, h, work, rows):
    """One token: x [1, H], out [1, H]; float32 scratch h [1, I], work (xk [1, H], hk [1, I]) for the kernel
    order of x and h (kernel_input), rows [C, >= 2 * max(H, I)]."""
    hidden, inter, chunks = out.shape[1], gate_up[0].shape[0] // 2, rows.shape[0]
    x0 = kernel_input(gate_up, x, work[0])[0]
    for c in prange(chunks):
        start, stop = _chunk(c, chunks, inter)
        for j in range(start, stop):
            wg, wu = _decode_pair(gate_up, j, inter + j, rows[c], hidden)
            g, u = _dot2x1(wg, wu, x0)
            h[0, j] = activate(g, act) * u
    h0 = kernel_input(down, h, work[1])[0]
    for c in prange(chunks):
        wd = rows[c, :inter]
        start, stop = _chunk(c, chunks, hidden)
        for r in range(start, stop):
            decode_row(down, r, wd)
            out[0, r] = _dot1(wd, h0)


@njit(**_OPTS)
def _block_sums(x, sums):
    """sums[b] = x[b * ACT_BLOCK: (b + 1) * ACT_BLOCK].sum() (the last block may be short)."""
    width = x.size
    for b in range(sums.size):
        total = np.float32(0.0)
        for k in range(b * ACT_BLOCK, min(width, (b + 1) * ACT_BLOCK)):
            total += x[k]
        sums[b] = total


@njit(parallel=True, **_OPTS)
def int4_direct_decode(x, gate_up, down, act, out, h, work, sums):
    """One token through an int4 expert whose groups are whole ACT_BLOCKs (64 or 128 columns), weight-only:
    each row's codes meet the float32 inputs in simd.q4f_blocks_dot (no decoded row written out and read
    back). x [1, H], out [1, H]; float32 scratch h [1, I], work (xk [1, H], hk [1, I]) for the inputs in the
    int4 rows' column order (kernel_input), sums (x's [NBH], h's [NBI]) block sums. Each row loop is written
    for rows with and without a short last block (int_kernels.int_ffn)."""
    hidden, inter = out.shape[1], h.shape[1]
    x0 = kernel_input(gate_up, x, work[0])[0]
    _block_sums(x[0], sums[0])
    xsum = sums[0]
    q, scale, zero, shift = gate_up[0], gate_up[1], gate_up[2], _group_shift(gate_up[3])
    if hidden % ACT_BLOCK:
        for j in prange(inter):
            g = q4f_blocks_dot(q, j, scale, zero, shift, x0, xsum)
            h[0, j] = activate(g, act) * q4f_blocks_dot(q, inter + j, scale, zero, shift, x0, xsum)
    else:
        for j in prange(inter):
            g = q4f_full_blocks_dot(q, j, scale, zero, shift, x0, xsum)
            h[0, j] = activate(g, act) * q4f_full_blocks_dot(q, inter + j, scale, zero, shift, x0, xsum)
    h0 = kernel_input(down, h, work[1])[0]
    _block_sums(h[0], sums[1])
    hsum = sums[1]
    q, scale, zero, shift = down[0], down[1], down[2], _group_shift(down[3])
    if inter % ACT_BLOCK:
        for r in prange(hidden):
            out[0, r] = q4f_blocks_dot(q, r, scale, zero, shift, h0, hsum)
    else:
        for r in prange(hidden):
            out[0, r] = q4f_full_blocks_dot(q, r, scale, zero, shift, h0, hsum)


@njit(parallel=True, **_OPTS)
def fp8_direct_decode(x, gate_up, down, act, out, h):
    """One token through an fp8 expert: each row's codes decode in registers and meet x (then h) in
    simd.fp8_blocks_dot, no decoded row written out and read back. x [1, H], out [1, H], scratch h [1, I].
    Each row loop is written for rows with and without a short last step (int_kernels.int_ffn)."""
    hidden, inter = out.shape[1], h.shape[1]
    q, scale, split = gate_up
    x0 = x[0]
    if hidden % FP8_STEP:
        for j in prange(inter):
            g = fp8_blocks_dot(q, j, scale[_fp8_block_row(j, split)], x0)
            h[0, j] = activate(g, act) * fp8_blocks_dot(q, inter + j, scale[_fp8_block_row(inter + j, split)], x0)
    else:
        for j in prange(inter):
            g = fp8_full_blocks_dot(q, j, scale[_fp8_block_row(j, split)], x0)
            h[0, j] = activate(g, act) * fp8_full_blocks_dot(q, inter + j, scale[_fp8_block_row(inter + j, split)], x0)
    q, scale, split = down
    h0 = h[0]
    if inter % FP8_STEP:
        for r in prange(hidden):
            out[0, r] = fp8_blocks_dot(q, r, scale[_fp8_block_row(r, split)], h0)
    else:
        for r in prange(hidden):
            out[0, r] = fp8_full_blocks_dot(q, r, scale[_fp8_block_row(r, split)], h0)


@njit(**_OPTS)
def _pair_tokens(wa, wb, x, y, ca, cb, act):
    """y[:, ca], y[:, cb] = (wa . x[t], wb . x[t]) for every token, TOKEN_BLOCK at a time; with act >= 0
    y[:, ca] = act(wa . x[t]) * (wb . x[t]) instead (a gate/up pair; cb unused)."""
    tokens = x.shape[0]
    full = tokens - tokens % TOKEN_BLOCK
    for t in range(0, full, TOKEN_BLOCK):
        a0, a1, a2, a3, b0, b1, b2, b3 = _dot2x4(wa, wb, x[t], x[t + 1], x[t + 2], x[t + 3])
        _store(y, t, ca, cb, a0, b0, act)
        _store(y, t + 1, ca, cb, a1, b1, act)
        _store(y, t + 2, ca, cb, a2, b2, act)
        _store(y, t + 3, ca, cb, a3, b3, act)
    for t in range(full, tokens):
        a, b = _dot2x1(wa, wb, x[t])
        _store(y, t, ca, cb, a, b, act)


@njit(inline="always", **_OPTS)
def _store(y, t, ca, cb, a, b, act):
    """One token's results of a row pair: act(a) * b into column ca (act >= 0), or a, b into ca, cb."""
    if act >= 0:
        y[t, ca] = activate(a, act) * b
    else:
        y[t, ca] = a
        y[t, cb] = b


@njit(parallel=True, **_OPTS)
def packed_prefill(x, gate_up, down, act, out, h, work, rows):
    """T tokens: x [T, H], out [T, H]; float32 scratch h [T, I], work (xk [T, H], hk [T, I]) for the kernel
    order of x and h (kernel_input), rows [C, >= 2 * max(H, I)]."""
    hidden, inter, chunks = out.shape[1], gate_up[0].shape[0] // 2, rows.shape[0]
    xk = kernel_input(gate_up, x, work[0])
    for c in prange(chunks):
        start, stop = _chunk(c, chunks, inter)
        for j in range(start, stop):
            wg, wu = _decode_pair(gate_up, j, inter + j, rows[c], hidden)
            _pair_tokens(wg, wu, xk, h, j, j, act)
    hk = kernel_input(down, h, work[1])
    for c in prange(chunks):
        start, stop = _chunk(c, chunks, (hidden + 1) // 2)
        for p in range(start, stop):
            ra, rb = 2 * p, min(2 * p + 1, hidden - 1)   # odd H: the last row pairs with itself
            wa, wb = _decode_pair(down, ra, rb, rows[c], inter)
            _pair_tokens(wa, wb, hk, out, ra, rb, -1)


def _store_weight(out, j, value):
    """out[j] = a float32 value, as bfloat16 bits when out is uint16 (numba only)."""
    raise NotImplementedError("_store_weight is only callable from numba-compiled code")


@overload(_store_weight, inline="always")
def _store_weight_overload(out, j, value):
    if isinstance(out, types.Array) and out.dtype == types.uint16:
        def store_bf16(out, j, value):
            out[j] = _f32_to_bf16_bits(value)
        return store_bf16

    def store(out, j, value):
        out[j] = value
    return store


@njit(inline="always", **_OPTS)
def _int4_exact_bytes(q, r, j0, j1, z, s, low, high):
    """low[j], high[j] = (low, high nibble of q[r, j] - z) * s for bytes j0..j1-1, in float32 without
    fast-math (packed.dequantize_int4's operations), stored as float32 or bfloat16 bits (_store_weight)."""
    for j in range(j0, j1):
        b = np.int32(q[r, j])    # int32 constants too: an int64 literal makes the codes int64 (vcvtqq2ps)
        _store_weight(low, j, (np.float32(b & np.int32(15)) - z) * s)
        _store_weight(high, j, (np.float32(b >> np.int32(4)) - z) * s)


@njit(inline="always", **_OPTS)
def _int4_exact_row(q, scale, zero, r, low, high, chunk, per_group):
    """Row r into low/high, ``chunk`` bytes at a time (inlined with a constant ``chunk``, as in
    _int4_decode_chunks), then the bytes of a short last group."""
    half = q.shape[1]
    full = half // chunk
    for k in range(full):
        g = k // per_group
        _int4_exact_bytes(q, r, k * chunk, k * chunk + chunk, _f16_bits_to_f32(zero[r, g]),
                          _f16_bits_to_f32(scale[r, g]), low, high)
    g = full // per_group
    if full * chunk < half:
        _int4_exact_bytes(q, r, full * chunk, half, _f16_bits_to_f32(zero[r, g]), _f16_bits_to_f32(scale[r, g]),
                          low, high)


@njit(parallel=True, **_OPTS)
def dequantize_int4_exact(q, scale, zero, group, out):
    """out [R, K] = an int4 matrix (q uint8 [R, K/2], float16-bit scale and zero int16 [R, ceil(K/G)])
    dequantized bit for bit as packed.dequantize_int4 computes it, (code - zero) * scale in float32 (no
    contraction applies), into float32 or (out uint16) bfloat16 bits rounded as torch's .to(torch.bfloat16)
    rounds: the weights a device computes with. Deinterleaved column order: out[:, :K/2] the even columns,
    out[:, K/2:] the odd ones. Rows over threads; per row, groups of 64 or 128 columns run simd.py's explicit
    vector form (2-3x faster than LLVM's vectorization of the loop below), groups of 32 constant-trip chunks of
    INT4_SMALL_CHUNK bytes, which LLVM vectorizes (run-time trip counts it does not)."""
    half = q.shape[1]
    flat = out.reshape(-1)                       # 1-D slices of it are contiguous to numba (row slices are not)
    if group % ACT_BLOCK == 0:                   # groups of 64 / 128: simd.int4_dequant_row, 32 bytes a step
        shift = _group_shift(group)
        if half % (ACT_BLOCK // 2):
            for r in prange(q.shape[0]):
                int4_dequant_row(q, r, scale, zero, shift, flat[r * 2 * half: r * 2 * half + half],
                                 flat[r * 2 * half + half: (r + 1) * 2 * half])
        else:
            for r in prange(q.shape[0]):
                int4_dequant_full_row(q, r, scale, zero, shift, flat[r * 2 * half: r * 2 * half + half],
                                      flat[r * 2 * half + half: (r + 1) * 2 * half])
        return
    small = group % (2 * INT4_CHUNK) != 0
    for r in prange(q.shape[0]):
        low, high = flat[r * 2 * half: r * 2 * half + half], flat[r * 2 * half + half: (r + 1) * 2 * half]
        if small:
            _int4_exact_row(q, scale, zero, r, low, high, INT4_SMALL_CHUNK, group // (2 * INT4_SMALL_CHUNK))
        else:
            _int4_exact_row(q, scale, zero, r, low, high, INT4_CHUNK, group // (2 * INT4_CHUNK))


@njit(nogil=True, cache=True)
def _f32_to_bf16_bits(v):
    """float32 -> bfloat16 bits, round to nearest even (a NaN stays a quiet NaN). LLVM inlines it; numba's
    own inlining (inline="always") of its branch warns about SSA."""
    bits = _f32_bits(v)
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(nogil=True, cache=True, parallel=True)
def fake_quantize_rows(x, out, deinterleave):
    """act_quant.fake_quantize on a CPU: x [T, K] float32, or bfloat16 bits as uint16 -> out [T, K] of the same
    dtype, each value q * scale computed as fake_quantize computes it, bit for bit (the float32 block max,
    division, round half to even and product, then bfloat16's round to nearest even); with ``deinterleave``
    out[t] holds the even inputs, then the odd ones (the column order of the int4 weights the torch backend
    dequantizes), in one pass. Tokens over threads; no fast-math (a reciprocal would change the codes)."""
    tokens, width = x.shape
    half = width // 2
    for t in prange(tokens):
        for b in range((width + ACT_BLOCK - 1) // ACT_BLOCK):
            k0, k1 = b * ACT_BLOCK, min(width, (b + 1) * ACT_BLOCK)
            amax = np.float32(0.0)
            for k in range(k0, k1):
                amax = max(amax, abs(widen(x[t, k])))
            s = amax / np.float32(Q_MAX)
            for k in range(k0, k1):
                v = np.float32(0.0)
                if s > 0:
                    v = min(max(np.rint(widen(x[t, k]) / s), np.float32(-Q_MAX)), np.float32(Q_MAX))
                _store_weight(out[t], (k % 2) * half + k // 2 if deinterleave else k, v * s)
