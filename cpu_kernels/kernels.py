"""Numba kernels of one gated expert FFN over the expert's contiguous weight block.

    # T = tokens, H = hidden, I = intermediate
    block = [gate_up [2I, H] row-major | down [H, I] row-major]   (1-D, any weight format)
    h = act(gate_up[:I] @ x) * (gate_up[I:] @ x)                   # [T, I]
    y = down @ h                                                   # [T, H]

Weights are widened to float32 in registers (see formats.widen) and products accumulate
in float32. `scales` holds one float32 factor per output row ([2I + H], int8 blocks) or is
empty (float blocks). Two paths:

  * decode (T = 1): one dot product per weight row, rows split over threads (prange), the
    block streamed once from memory;
  * prefill (T > 1): each pass over a weight row pair serves TOKEN_BLOCK tokens with all
    accumulators in registers; the row pair stays in L1 while the token blocks go by, so the
    block is still read from memory once per call.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .activations import activate
from .formats import widen

# Tokens served by one pass over a weight row (accumulators kept in registers).
TOKEN_BLOCK = 4
# Reassociation (vectorised reductions) and FMA contraction; NaN/inf semantics are kept.
FAST = {"reassoc", "contract", "nsz", "arcp"}
_OPTS = {"nogil": True, "cache": True, "fastmath": FAST}


@njit(**_OPTS)
def _row_scale(scales, row):
    """Per-row dequantisation factor (1 when the block carries no scales)."""
    if scales.size == 0:
        return np.float32(1.0)
    return scales[row]


@njit(**_OPTS)
def _dot1(wa, xa):
    """wa . xa over the common length (1-D views, so loads are contiguous and vectorise)."""
    acc = np.float32(0.0)
    for k in range(wa.size):
        acc += widen(wa[k]) * xa[k]
    return acc


@njit(**_OPTS)
def _dot2x1(wa, wb, xa):
    """Two weight rows against one token: (wa . xa, wb . xa)."""
    a = np.float32(0.0)
    b = np.float32(0.0)
    for k in range(wa.size):
        xk = xa[k]
        a += widen(wa[k]) * xk
        b += widen(wb[k]) * xk
    return a, b


@njit(**_OPTS)
def _dot2x4(wa, wb, x0, x1, x2, x3):
    """Two weight rows against four tokens: eight dot products, each weight read once."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    b0 = np.float32(0.0)
    b1 = np.float32(0.0)
    b2 = np.float32(0.0)
    b3 = np.float32(0.0)
    for k in range(wa.size):
        va = widen(wa[k])
        vb = widen(wb[k])
        a0 += va * x0[k]
        a1 += va * x1[k]
        a2 += va * x2[k]
        a3 += va * x3[k]
        b0 += vb * x0[k]
        b1 += vb * x1[k]
        b2 += vb * x2[k]
        b3 += vb * x3[k]
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(**_OPTS)
def _row(w, row, width, base):
    """View of weight row `row` (length `width`) of the matrix starting at block offset `base`."""
    start = base + row * width
    return w[start:start + width]


@njit(parallel=True, **_OPTS)
def ffn_decode(x, w, scales, hidden, inter, act, out, h):
    """One token: x [1, H] float32, w block, out [1, H] float32, h [>=1, I] float32 scratch."""
    down = 2 * inter * hidden
    x0 = x[0]  # [H]
    h0 = h[0]  # [I]
    for j in prange(inter):
        g, u = _dot2x1(_row(w, j, hidden, 0), _row(w, inter + j, hidden, 0), x0)
        g *= _row_scale(scales, j)
        u *= _row_scale(scales, inter + j)
        h0[j] = activate(g, act) * u
    for r in prange(hidden):
        out[0, r] = _dot1(_row(w, r, inter, down), h0) * _row_scale(scales, 2 * inter + r)


@njit(**_OPTS)
def _gate_up_rows(x, w, scales, hidden, inter, act, h, j):
    """h[:, j] = act(gate_j . x) * (up_j . x) for all tokens, TOKEN_BLOCK at a time."""
    tokens = x.shape[0]
    sg = _row_scale(scales, j)
    su = _row_scale(scales, inter + j)
    wg = _row(w, j, hidden, 0)
    wu = _row(w, inter + j, hidden, 0)
    full = tokens - tokens % TOKEN_BLOCK
    for t in range(0, full, TOKEN_BLOCK):
        g0, g1, g2, g3, u0, u1, u2, u3 = _dot2x4(wg, wu, x[t], x[t + 1], x[t + 2], x[t + 3])
        h[t, j] = activate(g0 * sg, act) * (u0 * su)
        h[t + 1, j] = activate(g1 * sg, act) * (u1 * su)
        h[t + 2, j] = activate(g2 * sg, act) * (u2 * su)
        h[t + 3, j] = activate(g3 * sg, act) * (u3 * su)
    for t in range(full, tokens):
        g, u = _dot2x1(wg, wu, x[t])
        h[t, j] = activate(g * sg, act) * (u * su)


@njit(**_OPTS)
def _down_rows(w, scales, hidden, inter, h, out, r):
    """out[:, r] and out[:, r + 1] = down rows r, r + 1 against h, for all tokens (r + 1 < H)."""
    tokens = out.shape[0]
    down = 2 * inter * hidden
    sa = _row_scale(scales, 2 * inter + r)
    sb = _row_scale(scales, 2 * inter + r + 1)
    wa = _row(w, r, inter, down)
    wb = _row(w, r + 1, inter, down)
    full = tokens - tokens % TOKEN_BLOCK
    for t in range(0, full, TOKEN_BLOCK):
        a0, a1, a2, a3, b0, b1, b2, b3 = _dot2x4(wa, wb, h[t], h[t + 1], h[t + 2], h[t + 3])
        out[t, r] = a0 * sa
        out[t + 1, r] = a1 * sa
        out[t + 2, r] = a2 * sa
        out[t + 3, r] = a3 * sa
        out[t, r + 1] = b0 * sb
        out[t + 1, r + 1] = b1 * sb
        out[t + 2, r + 1] = b2 * sb
        out[t + 3, r + 1] = b3 * sb
    for t in range(full, tokens):
        a, b = _dot2x1(wa, wb, h[t])
        out[t, r] = a * sa
        out[t, r + 1] = b * sb


@njit(**_OPTS)
def _down_last_row(w, scales, hidden, inter, h, out):
    """out[:, H - 1] for odd H (the row left over by the row pairs)."""
    last = hidden - 1
    wl = _row(w, last, inter, 2 * inter * hidden)
    s = _row_scale(scales, 2 * inter + last)
    for t in range(out.shape[0]):
        out[t, last] = _dot1(wl, h[t]) * s


@njit(parallel=True, **_OPTS)
def ffn_prefill(x, w, scales, hidden, inter, act, out, h):
    """T tokens: x [T, H] float32, w block, out [T, H] float32, h [T, I] float32 scratch."""
    for j in prange(inter):
        _gate_up_rows(x, w, scales, hidden, inter, act, h, j)
    for p in prange(hidden // 2):
        _down_rows(w, scales, hidden, inter, h, out, 2 * p)
    if hidden % 2:
        _down_last_row(w, scales, hidden, inter, h, out)


@njit(parallel=True, **_OPTS)
def linear_rows(x, w, out):
    """out [T, N] = x [T, K] float32 . w [N, K]^T, w's elements widened to float32 in registers (bf16 as uint16
    bits, fp16 as int16 bits: formats.widen) and products summed in float32. Rows of w are split over threads;
    each row serves every token while it is in L1, so w is read from memory once per call (a dense nn.Linear
    on a CPU-only run: runtime/dense_cpu.py)."""
    for n in prange(w.shape[0]):
        wn = w[n]
        for t in range(x.shape[0]):
            out[t, n] = _dot1(wn, x[t])
