"""Token-row gather and weighted scatter-add (index_add) kernels used around expert calls.

    # T = tokens, H = hidden, n = rows routed to one expert
"""

from __future__ import annotations

from numba import njit


@njit(nogil=True, cache=True)
def gather_rows(src, rows, dst):
    """dst[i, :] = src[rows[i], :]; src [T, H], rows [n] int64, dst [>=n, H]."""
    for i in range(rows.size):
        dst[i, :] = src[rows[i], :]


@njit(nogil=True, cache=True)
def scatter_add_rows(dst, rows, weights, src):
    """dst[rows[i], :] += weights[i] * src[i, :] (index_add; repeated rows add up)."""
    for i in range(rows.size):
        r = rows[i]
        w = weights[i]
        for k in range(dst.shape[1]):
            dst[r, k] += w * src[i, k]
