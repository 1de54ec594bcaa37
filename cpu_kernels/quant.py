"""Per-output-row symmetric int8 quantisation of expert blocks.

    # H = hidden, I = intermediate
    q      int8    [3 * I * H]   same layout as the block (gate_up [2I, H] | down [H, I])
    scales float32 [2I + H]      one per output row: gate_up rows, then down rows
    W[r, :] ~= scales[r] * q[r, :],   scales[r] = max |W[r, :]| / 127

Rounding error per weight is at most scales[r] / 2 = max|W[r]| / 254.
"""

from __future__ import annotations

import numpy as np

from .blocks import block_matrices, check_block
from .formats import kernel_view
from .quantize_kernels import int8_rows


def quantize_block_int8(block: np.ndarray, hidden: int, inter: int) -> tuple[np.ndarray, np.ndarray]:
    """Expert block (float32 / float16 / uint16 bf16 bits) -> (q int8 [3IH], scales float32 [2I+H])."""
    if block.dtype == np.int8:
        raise ValueError("block is already int8")
    check_block(block, hidden, inter)
    q = np.empty(block.size, dtype=np.int8)
    scales = np.empty(2 * inter + hidden, dtype=np.float32)
    gate_up, down = block_matrices(block, hidden, inter)
    q_gate_up, q_down = block_matrices(q, hidden, inter)
    # the packed int8 format's own quantizer (bit-identical to packed.quantize_int8), reading the stored bits
    int8_rows(kernel_view(gate_up), q_gate_up, scales[:2 * inter])
    int8_rows(kernel_view(down), q_down, scales[2 * inter:])
    return q, scales


def check_scales(scales: np.ndarray, hidden: int, inter: int) -> None:
    """Validate the per-row scales of an int8 block."""
    if not isinstance(scales, np.ndarray) or scales.dtype != np.float32:
        raise ValueError("int8 block scales must be a float32 numpy array")
    if scales.shape != (2 * inter + hidden,) or not scales.flags.c_contiguous:
        raise ValueError(
            f"int8 block scales must be contiguous with shape ({2 * inter + hidden},) = (2I + H,), "
            f"got {scales.shape}"
        )


def dequantize_block_int8(q: np.ndarray, scales: np.ndarray, hidden: int, inter: int) -> np.ndarray:
    """(q, scales) -> float32 block [3IH] (a new array; for references and accuracy checks)."""
    check_block(q, hidden, inter)
    check_scales(scales, hidden, inter)
    q_gate_up, q_down = block_matrices(q, hidden, inter)
    gate_up = q_gate_up.astype(np.float32) * scales[:2 * inter, None]
    down = q_down.astype(np.float32) * scales[2 * inter:, None]
    return np.concatenate([gate_up.reshape(-1), down.reshape(-1)])
