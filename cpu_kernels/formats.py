"""Weight element formats: numba-side widening to float32 and numpy-side format detection.

Inside the kernels every weight element is widened to float32 in registers by `widen`,
dispatched at compile time on the array's element type:

    float32 -> as is
    uint16  -> bf16 bits (shift into the high half of a uint32, reinterpret as float32)
    int16   -> fp16 bits (numba has no CPU float16, so fp16 blocks travel as int16 views;
               LLVM lowers the half -> float extension to F16C `vcvtph2ps`)
    int8    -> int8 value (the per-row scale is applied once per dot product)

Users never pass int16: `kernel_view` turns a float16 block into its int16 view.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

# Block dtype (numpy) -> format name.
FORMATS = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(np.uint16): "bfloat16",
    np.dtype(np.int8): "int8",
}
# Format name aliases a user may pass -> canonical format name.
FORMAT_ALIASES = {
    "float32": "float32", "fp32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "int8": "int8",
}
# Bytes per weight element of each format.
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def canonical_format(name: str) -> str:
    """'bf16' / 'bfloat16' / 'fp16' / ... -> canonical format name; ValueError if unknown."""
    key = str(name).lower().replace("torch.", "")  # accepts torch dtypes too
    if key not in FORMAT_ALIASES:
        raise ValueError(f"unknown weight format {name!r}; use one of {sorted(set(FORMAT_ALIASES.values()))}")
    return FORMAT_ALIASES[key]


def block_format(block: np.ndarray) -> str:
    """Format name of a numpy expert block; ValueError for an unsupported dtype."""
    fmt = FORMATS.get(block.dtype)
    if fmt is None:
        raise ValueError(
            f"expert block has dtype {block.dtype}; expected float32, float16, uint16 (bf16 bits) "
            "or int8 (with scales). View a torch bf16 tensor with as_numpy_block()"
        )
    return fmt


def kernel_view(block: np.ndarray) -> np.ndarray:
    """The array the kernels read: float16 blocks become their int16 bit view, others unchanged."""
    if block.dtype == np.float16:
        return block.view(np.int16)
    return block


@intrinsic
def _f32_bits(typingctx, value):
    """float32 -> its uint32 bits (bitcast)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bf16_bits_to_f32(typingctx, bits):
    """uint16 bf16 bits -> float32 (zero-extend, shift into the high half, bitcast)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        shifted = builder.shl(wide, ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(shifted, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f16_bits_to_f32(typingctx, bits):
    """int16 IEEE half bits -> float32 (bitcast to half, fpext)."""
    if bits != types.int16:
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(types.int16), codegen


def widen(value):
    """Weight element -> float32 (numba only; see the module docstring for the formats)."""
    raise NotImplementedError("widen is only callable from numba-compiled code")


@overload(widen, inline="always")
def _widen_overload(value):
    """Compile-time dispatch of `widen` on the element type."""
    if value == types.float32:
        return lambda value: value
    if value == types.uint16:
        return lambda value: _bf16_bits_to_f32(value)
    if value == types.int16:
        return lambda value: _f16_bits_to_f32(value)
    if value == types.int8:
        return lambda value: np.float32(value)
    return None
