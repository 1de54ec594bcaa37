"""Public entry point of the CPU expert kernels: one gated expert FFN over T tokens.

    # T = tokens, H = hidden, I = intermediate
    x       float32 [T, H]          contiguous
    block   [3 * I * H]             float32 / float16 / uint16 (bf16 bits) / int8 (+ scales)
    out     float32 [T, H]          written, never read
    scratch float32, >= T * I elems the [T, I] intermediate act(gate) * up
    out = down @ (act(gate_up[:I] @ x) * (gate_up[I:] @ x))

The kernels read the block in place: no copy, no per-call allocation of buffers.
"""

from __future__ import annotations

import numpy as np

from .activations import ACTIVATIONS, activation_code
from .blocks import check_block
from .formats import kernel_view
from .kernels import ffn_decode, ffn_prefill
from .quant import check_scales

# Empty scales: float blocks carry no per-row factors.
NO_SCALES = np.zeros(0, dtype=np.float32)


def _check_tokens(x: np.ndarray, hidden: int, name: str) -> int:
    """Validate a float32 [T, H] contiguous array; returns T."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        dtype = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"{name} must be a float32 numpy array, got {dtype}")
    if x.ndim != 2 or x.shape[1] != hidden or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape [T, H] = [T >= 1, {hidden}], got {list(x.shape)}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return x.shape[0]


def scratch_view(scratch: np.ndarray, tokens: int, inter: int) -> np.ndarray:
    """The [T, I] float32 view of the first T * I elements of a contiguous scratch buffer."""
    if not isinstance(scratch, np.ndarray) or scratch.dtype != np.float32 or not scratch.flags.c_contiguous:
        raise ValueError("scratch must be a C-contiguous float32 numpy array")
    if scratch.size < tokens * inter:
        raise ValueError(f"scratch holds {scratch.size} floats; T * I = {tokens} * {inter} needs {tokens * inter}")
    return scratch.reshape(-1)[: tokens * inter].reshape(tokens, inter)


def check_weights(block: np.ndarray, scales, hidden: int, inter: int) -> np.ndarray:
    """Validate a block (and the scales int8 blocks need); returns the scales the kernels read."""
    fmt = check_block(block, hidden, inter)
    if fmt == "int8":
        if scales is None:
            raise ValueError("an int8 block needs its per-row scales (see quantize_block_int8)")
        check_scales(scales, hidden, inter)
        return scales
    if scales is not None:
        raise ValueError(f"scales are only for int8 blocks; this block is {fmt}")
    return NO_SCALES


def check_act(act: str | int) -> int:
    """Activation name (or a valid code) -> kernel activation code."""
    if isinstance(act, (int, np.integer)) and not isinstance(act, bool):
        if int(act) not in ACTIVATIONS.values():
            raise ValueError(f"unknown activation code {act}; use a name from {sorted(ACTIVATIONS)}")
        return int(act)
    return activation_code(act)


def expert_ffn(
    x: np.ndarray,
    block: np.ndarray,
    hidden: int,
    inter: int,
    act: str | int,
    out: np.ndarray,
    scratch: np.ndarray,
    scales: np.ndarray | None = None,
) -> np.ndarray:
    """out [T, H] = expert FFN of x [T, H] with the weights of `block`; returns `out`.

    act: transformers `hidden_act` name ("silu", "gelu", "gelu_pytorch_tanh") or its code.
    scales: float32 [2I + H] per-row factors, required for (and only for) int8 blocks.
    T = 1 takes the memory-bound matvec path, T > 1 the token-blocked path.
    """
    tokens = _check_tokens(x, hidden, "x")
    if _check_tokens(out, hidden, "out") != tokens:
        raise ValueError(f"out has {out.shape[0]} rows, x has {tokens}")
    row_scales = check_weights(block, scales, hidden, inter)
    code = check_act(act)
    h = scratch_view(scratch, tokens, inter)  # [T, I]
    kernel = ffn_decode if tokens == 1 else ffn_prefill
    kernel(x, kernel_view(block), row_scales, hidden, inter, code, out, h)
    return out
