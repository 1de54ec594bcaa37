"""Packed (quantized) experts on the Numba kernels: one gated expert FFN read from an ExpertFormat row.

    # T = tokens, H = hidden, I = intermediate
    row  uint8 [fmt.nbytes]   one expert in ExpertFormat's layout (int8, int4, int4-g32, int4-g128, fp8)
    x    float32 [T, H] ; out float32 [T, H] written
    scratch float32 >= T * (2I + H)      h [T, I], and x and h in the kernels' column order (int4)
    rows float32 [C, >= 2 * max(H, I)]   C = row chunks (threads), each one's decoded row pair
    out = down @ (act(gate @ x) * (up @ x))

int8 rows run on the int8 block kernels (kernels.py): the row's first 3IH bytes are exactly an
int8 block and its scales segment the per-row scales. int4 and fp8 rows run on packed_kernels.py.
"-a8" rows (int8-a8, int4-a8, int4-g128-a8) run on int_kernels.py (int8 activations, integer dots).
The torch backend of the same computation is torch_backend.TorchExperts.
"""

from __future__ import annotations

import numpy as np

from .act_quant import ACT_BLOCK, act_blocks
from .ffn import _check_tokens, check_act
from .int_kernels import int_ffn
from .kernels import ffn_decode, ffn_prefill
from .packed import ExpertFormat
from .packed_kernels import INT4_SMALL_CHUNK, fp8_direct_decode, int4_direct_decode, packed_decode, packed_prefill


def check_packed(row: np.ndarray, fmt: ExpertFormat, hidden: int) -> int:
    """Validate a packed row against its format; returns I."""
    if not isinstance(fmt, ExpertFormat) or not fmt.packed:
        raise ValueError(f"a packed expert needs a packed ExpertFormat (int8, int4, int4-g32, int4-g128, fp8), got {fmt!r}")
    if not isinstance(row, np.ndarray) or row.dtype != np.uint8 or row.ndim != 1:
        raise ValueError(f"a packed {fmt.name} expert is a 1-D uint8 numpy row, got {getattr(row, 'dtype', row)}")
    if row.size != fmt.nbytes or fmt.hidden != hidden:
        raise ValueError(f"packed {fmt.name} row of {row.size} bytes for H={hidden}; the format expects "
                         f"{fmt.nbytes} bytes for H={fmt.hidden}")
    if not row.flags.c_contiguous:
        raise ValueError(f"a packed {fmt.name} expert row must be contiguous")
    return fmt.inter


def packed_matrices(fmt: ExpertFormat, row: np.ndarray) -> tuple:
    """The kernels' view of a packed row, no copy.

    int8: (q int8 [3IH] block, scales float32 [2I + H]); int8-a8: two (q int8 [R, K], scales [R]) matrices;
    int4 (and int4-a8): two (q, scale, zero, G) matrices, the
    float16 arrays as int16 bits; fp8: two (q, scale, split) matrices (split: I for gate_up, H for down).
    """
    views = fmt.numpy_views(row)
    if fmt.group % (2 * INT4_SMALL_CHUNK):
        raise ValueError(f"int4 kernels need groups of a multiple of {2 * INT4_SMALL_CHUNK} columns, got {fmt.group}")
    if fmt.name == "int8-a8":
        scales = views["scales"]
        return ((views["gate_up"], scales[: 2 * fmt.inter]), (views["down"], scales[2 * fmt.inter:]))
    if fmt.name == "int8":
        return row[: 3 * fmt.hidden * fmt.inter].view(np.int8), views["scales"]
    if fmt.group:
        return tuple((views[m], views[f"{m}_scale"].view(np.int16), views[f"{m}_zero"].view(np.int16), fmt.group)
                     for m in ("gate_up", "down"))
    return ((views["gate_up"], views["gate_up_scale"], fmt.inter), (views["down"], views["down_scale"], fmt.hidden))


def packed_scratch_size(fmt: ExpertFormat, tokens: int) -> int:
    """Floats of the ``scratch`` packed_ffn needs for ``tokens`` tokens: h [T, I], hk [T, I], xk [T, H] and the
    block sums of one token's x and h (int4_direct_decode); for "-a8" formats h and the quantized x and h
    (_quantized_views)."""
    if fmt.act_quant:
        return sum(_quantized_sizes(fmt, tokens))
    return tokens * (2 * fmt.inter + fmt.hidden) + act_blocks(fmt.hidden) + act_blocks(fmt.inter)


def _quantized_sizes(fmt: ExpertFormat, tokens: int) -> list[int]:
    """Floats (4-byte words) of h, then of x's and h's (codes, scales, code sums)."""
    sizes = [tokens * fmt.inter]
    for width in (fmt.hidden, fmt.inter):
        sizes += [-(-tokens * width // 2), tokens * act_blocks(width), tokens * act_blocks(width)]
    return sizes


def _quantized_views(scratch: np.ndarray, fmt: ExpertFormat, tokens: int) -> tuple:
    """(h float32 [T, I], (codes int16 [T, H], scales float32 [T, NBH], sums int32 [T, NBH]), the same for h)
    views of a flat float32 scratch."""
    flat, parts, start = _flat_scratch(scratch, packed_scratch_size(fmt, tokens)), [], 0
    for size in _quantized_sizes(fmt, tokens):
        parts.append(flat[start:start + size])
        start += size
    quantized = []
    for i, width in enumerate((fmt.hidden, fmt.inter)):
        codes, scales, sums = parts[1 + 3 * i: 4 + 3 * i]
        blocks = act_blocks(width)
        quantized.append((codes.view(np.int16)[: tokens * width].reshape(tokens, width),
                          scales.reshape(tokens, blocks), sums.view(np.int32).reshape(tokens, blocks)))
    return parts[0].reshape(tokens, fmt.inter), quantized[0], quantized[1]


def _flat_scratch(scratch: np.ndarray, need: int) -> np.ndarray:
    """The validated flat float32 scratch (>= need floats)."""
    if not isinstance(scratch, np.ndarray) or scratch.dtype != np.float32 or not scratch.flags.c_contiguous:
        raise ValueError("scratch must be a C-contiguous float32 numpy array")
    if scratch.size < need:
        raise ValueError(f"scratch holds {scratch.size} floats; this packed expert needs {need} "
                         "(packed_scratch_size)")
    return scratch.reshape(-1)


def _scratch_views(scratch: np.ndarray, fmt: ExpertFormat, tokens: int) -> tuple:
    """(h [T, I], (xk [T, H], hk [T, I]), (x block sums [NBH], h block sums [NBI])) views of a flat float32
    scratch of >= packed_scratch_size floats."""
    h_size, x_size = tokens * fmt.inter, tokens * fmt.hidden
    flat = _flat_scratch(scratch, packed_scratch_size(fmt, tokens))
    h = flat[:h_size].reshape(tokens, fmt.inter)
    hk = flat[h_size:2 * h_size].reshape(tokens, fmt.inter)
    xk = flat[2 * h_size:2 * h_size + x_size].reshape(tokens, fmt.hidden)
    sums = flat[2 * h_size + x_size:]
    x_blocks, h_blocks = act_blocks(fmt.hidden), act_blocks(fmt.inter)
    return h, (xk, hk), (sums[:x_blocks], sums[x_blocks:x_blocks + h_blocks])


def row_buffer_width(fmt: ExpertFormat) -> int:
    """Floats per chunk of the ``rows`` buffer packed_ffn needs: one decoded row pair."""
    return 2 * max(fmt.hidden, fmt.inter)


def _check_rows(rows: np.ndarray, fmt: ExpertFormat) -> None:
    """Validate the per-chunk decoded-row buffers."""
    width = row_buffer_width(fmt)
    if not isinstance(rows, np.ndarray) or rows.dtype != np.float32 or not rows.flags.c_contiguous:
        raise ValueError("rows must be a C-contiguous float32 numpy array [C, 2 * max(H, I)]")
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] < width:
        raise ValueError(f"rows must have shape [C >= 1, >= 2 * max(H, I) = {width}], got {list(rows.shape)}")


def packed_ffn(x: np.ndarray, row: np.ndarray, fmt: ExpertFormat, act: str | int, out: np.ndarray,
               scratch: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """out [T, H] = expert FFN of x [T, H] with the packed weights of ``row``; returns ``out``.

    scratch: float32, >= packed_scratch_size(fmt, T) floats. rows: float32 [C, >= row_buffer_width(fmt)],
    where the C row chunks (run in parallel) decode their rows (unused by int8 and "-a8" formats). T = 1 takes
    the decode path (bytes streamed once), T > 1 the token-blocked path; "-a8" formats run int_ffn at any T.
    """
    hidden = fmt.hidden
    tokens = _check_tokens(x, hidden, "x")
    if _check_tokens(out, hidden, "out") != tokens:
        raise ValueError(f"out has {out.shape[0]} rows, x has {tokens}")
    inter = check_packed(row, fmt, hidden)
    code = check_act(act)
    gate_up, down = packed_matrices(fmt, row)
    if fmt.act_quant:
        h, xq, hq = _quantized_views(scratch, fmt, tokens)   # h [T, I]
        int_ffn(x, gate_up, down, code, out, h, xq, hq)
        return out
    h, work, sums = _scratch_views(scratch, fmt, tokens)  # h [T, I]
    _check_rows(rows, fmt)
    if tokens == 1 and fmt.group and fmt.group % ACT_BLOCK == 0:
        int4_direct_decode(x, gate_up, down, code, out, h, work, sums)
        return out
    if tokens == 1 and fmt.storage == "fp8":
        fp8_direct_decode(x, gate_up, down, code, out, h)
        return out
    if fmt.name == "int8":
        kernel = ffn_decode if tokens == 1 else ffn_prefill
        kernel(x, gate_up, down, hidden, inter, code, out, h)
    else:
        kernel = packed_decode if tokens == 1 else packed_prefill
        kernel(x, gate_up, down, code, out, h, work, rows)
    return out
