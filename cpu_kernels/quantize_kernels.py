"""Numba quantizers of the int8 and int4 expert formats (packed.py), parallel over weight rows.

    # R = rows, K = columns (the input dim), G = int4 group size, NG = ceil(K / G)
    int8_rows(w [R, K], q int8 [R, K], scale float32 [R])
        per row: scale = max|w| / 127, q = clamp(round(w / scale), -127, 127)
    int4_rows(w [R, K], G, ls_steps, hqq_steps, q uint8 [R, K/2], scale int16 [R, NG], zero int16 [R, NG])
        per group: min-max (scale, zero), then ``ls_steps`` least-squares refits of (scale, zero) to the
        current codes and ``hqq_steps`` half-quadratic steps of the zero point (HQQ), each kept where it
        lowers the group's squared error; scale and zero are float16 (their bits, as int16)

``w`` is the weight as the checkpoint stores it: float32, bf16 bits (uint16) or fp16 bits (int16), widened
in registers (formats.widen), so a bf16 tensor is never copied to float32 first. Outputs are written in
place: the views of an expert's row. The arithmetic is packed.py's torch quantizers' (the device path and
the reference) step for step in float32, round half to even; int8 is bit-identical to it, int4 can differ
in the last bit of a sum, so a zero point may round to the neighbouring float16 in rare groups.

One prange iteration quantizes one row; an int4 group (64 or 128 floats) stays in registers / L1 for
every refinement step, so the whole fit reads the weights once from memory.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .formats import widen

_OPTS = {"nogil": True, "cache": True}
_SUMS = {**_OPTS, "fastmath": {"reassoc", "nsz"}}   # a group's sums vectorize (their order is free, as in torch)
_ZERO, _ONE, _HALF = np.float32(0.0), np.float32(1.0), np.float32(0.5)
_INT8_MAX, _INT4_MAX = np.float32(127.0), np.float32(15.0)
INT4_MIN_SCALE = np.float32(2.0**-14)      # floor of an int4 scale: the smallest normal float16 (a constant
                                           # group stays finite and exact)
_LP_FLOOR = np.float32(1e-8)               # floor of the l_p shrinkage's base
_LP_POWER = np.float32(-0.3)               # HQQ's sparse l_p norm, p = 0.7: |u|^(p - 1)
HQQ_BETA, HQQ_BETA_GROWTH = 10.0, 1.01     # the half-quadratic penalty and its growth per step


@intrinsic
def _f16_round(typingctx, value):
    """float32 -> the nearest float16, widened back to float32 (IEEE round to nearest even)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.float32), codegen


@intrinsic
def _f16_bits(typingctx, value):
    """float32 (already a float16 value) -> its float16 bits as int16."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(types.float32), codegen


@njit(parallel=True, **_OPTS)
def int8_rows(w, q, scale):
    """w [R, K] -> q int8 [R, K], scale float32 [R] (see the module docstring)."""
    rows, cols = w.shape
    for r in prange(rows):
        top = _ZERO
        for c in range(cols):
            top = max(top, abs(widen(w[r, c])))
        s = top / _INT8_MAX
        safe = s if s > _ZERO else _ONE
        for c in range(cols):
            q[r, c] = np.int8(min(max(np.rint(widen(w[r, c]) / safe), -_INT8_MAX), _INT8_MAX))
        scale[r] = s


@njit(inline="always", **_OPTS)
def _code(ws, zero):
    """round(w / scale + zero) clamped to 0..15, as float32."""
    return min(max(np.rint(ws + zero), _ZERO), _INT4_MAX)


@njit(**_SUMS)
def _group_error(wg, ws, scale, zero, n):
    """Squared error of the group (wg [n] weights, ws [n] = wg / scale) under (scale, zero)."""
    total = _ZERO
    for c in range(n):
        e = (_code(ws[c], zero) - zero) * scale - wg[c]
        total += e * e
    return total


@njit(**_SUMS)
def _least_squares(wg, ws, scale, zero):
    """(scale, zero) of the least-squares line w ~ scale * (code - zero) through the group's current codes,
    float16-rounded; the inputs back when the codes are all equal (no line)."""
    n = wg.shape[0]
    sq, sqq, sw, sqw = _ZERO, _ZERO, _ZERO, _ZERO
    for c in range(n):
        code = _code(ws[c], zero)
        sq += code
        sqq += code * code
        sw += wg[c]
        sqw += code * wg[c]
    count = np.float32(n)
    det = count * sqq - sq * sq
    if det <= _ZERO:
        return scale, zero
    slope = (count * sqw - sq * sw) / det
    if slope < INT4_MIN_SCALE:
        return scale, zero
    new_scale = _f16_round(slope)
    return new_scale, _f16_round(-((sw - slope * sq) / count) / new_scale)


@njit(**_SUMS)
def _hqq_zero(wg, ws, scale, zero, beta):
    """One half-quadratic step of the zero point (sparse l_p error, p = 0.7), float16-rounded."""
    n = wg.shape[0]
    penalty = np.float32(beta) * scale
    total = _ZERO
    for c in range(n):
        code = _code(ws[c], zero)
        u = ws[c] - code + zero
        mag = abs(u)
        shrunk = max(mag - max(mag * scale, _LP_FLOOR) ** _LP_POWER / penalty, _ZERO)
        total += code - ws[c] + (shrunk if u >= _ZERO else -shrunk)
    return _f16_round(total / np.float32(n))


@njit(**_OPTS)
def _fit_group(wg, ws, scale, zero, ls_steps, hqq_steps, trial):
    """Refine (scale, zero) of one group: ``ls_steps`` least-squares refits, then ``hqq_steps`` half-quadratic
    steps of the zero point, each kept only where it lowers the squared error. ``ws`` holds wg / scale on entry
    and on return (for the returned scale); ``trial`` [G] is scratch."""
    n = wg.shape[0]
    best_err = _group_error(wg, ws, scale, zero, n)
    for _ in range(ls_steps):
        new_scale, new_zero = _least_squares(wg, ws, scale, zero)
        for c in range(n):
            trial[c] = wg[c] / new_scale
        err = _group_error(wg, trial, new_scale, new_zero, n)
        if err < best_err:
            scale, zero, best_err = new_scale, new_zero, err
            ws[:n] = trial[:n]
    beta = HQQ_BETA
    for _ in range(hqq_steps):
        new_zero = _hqq_zero(wg, ws, scale, zero, beta)
        err = _group_error(wg, ws, scale, new_zero, n)
        if err < best_err:
            zero, best_err = new_zero, err
        beta *= HQQ_BETA_GROWTH
    return scale, zero


@njit(parallel=True, **_OPTS)
def int4_rows(w, group, ls_steps, hqq_steps, q, scale, zero):
    """w [R, K] (K even) -> q uint8 [R, K/2], scale/zero int16 float16 bits [R, NG] (see the module docstring).
    A short last group is padded with its last column, as packed.quantize_int4 pads it."""
    rows, cols = w.shape
    groups = (cols + group - 1) // group
    for r in prange(rows):
        wg = np.empty(group, np.float32)      # [G] the group's weights
        ws = np.empty(group, np.float32)      # [G] in units of its scale
        trial = np.empty(group, np.float32)   # [G] in units of a candidate scale
        for g in range(groups):
            start = g * group
            lo, hi = np.float32(np.inf), np.float32(-np.inf)
            for c in range(group):
                v = widen(w[r, min(start + c, cols - 1)])
                wg[c] = v
                lo, hi = min(lo, v), max(hi, v)
            s = _f16_round(max((hi - lo) / _INT4_MAX, INT4_MIN_SCALE))
            for c in range(group):
                ws[c] = wg[c] / s
            s, z = _fit_group(wg, ws, s, _f16_round(-lo / s), ls_steps, hqq_steps, trial)
            for c in range(0, min(group, cols - start), 2):
                low, high = _code(ws[c], z), _code(ws[c + 1], z)
                q[r, (start + c) // 2] = np.uint8(low) | (np.uint8(high) << np.uint8(4))
            scale[r, g], zero[r, g] = _f16_bits(s), _f16_bits(z)
