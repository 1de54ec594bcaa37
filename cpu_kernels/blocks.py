"""Expert weight blocks: zero-copy torch <-> numpy views, layout checks and matrix views.

    # H = hidden, I = intermediate
    block = [gate_up [2I, H] row-major | down [H, I] row-major], one contiguous 1-D array
    gate_up rows 0..I-1 = W_gate, rows I..2I-1 = W_up (transformers' fused gate_up_proj[e])

numpy has no bfloat16, so a bf16 block travels as its uint16 bit view.
"""

from __future__ import annotations

import numpy as np
import torch

from .formats import block_format

# torch dtype -> (dtype of the bit-identical view that numpy understands, or None if numpy has it).
_TORCH_VIEWS = {
    torch.float32: None,
    torch.float16: None,
    torch.int8: None,
    torch.bfloat16: torch.uint16,
}
# numpy block dtype -> torch dtype of the same bits.
_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.uint16): torch.bfloat16,
    np.dtype(np.int8): torch.int8,
}


def as_numpy_block(tensor: torch.Tensor) -> np.ndarray:
    """CPU torch block (float32 / float16 / bfloat16 / int8) -> 1-D numpy view, no copy.

    bfloat16 comes back as uint16 bits, the form the kernels read.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"expert block must be in host memory, got a tensor on {tensor.device}")
    if tensor.dtype not in _TORCH_VIEWS:
        raise ValueError(f"expert block dtype {tensor.dtype} unsupported; use float32, float16, bfloat16 or int8")
    if not tensor.is_contiguous():
        raise ValueError("expert block must be contiguous; the host store keeps one 1-D tensor per expert")
    view_dtype = _TORCH_VIEWS[tensor.dtype]
    flat = tensor.detach().reshape(-1)
    if view_dtype is not None:
        flat = flat.view(view_dtype)
    return flat.numpy()


def as_torch_block(block: np.ndarray) -> torch.Tensor:
    """numpy block -> torch tensor of the same bits, no copy (uint16 becomes bfloat16)."""
    dtype = _TORCH_DTYPES.get(block.dtype)
    if dtype is None:
        raise ValueError(f"block dtype {block.dtype} unsupported; use float32, float16, uint16 (bf16) or int8")
    tensor = torch.from_numpy(block)
    return tensor.view(dtype) if tensor.dtype != dtype else tensor


def check_block(block: np.ndarray, hidden: int, inter: int) -> str:
    """Validate an expert block against (H, I); returns its format name."""
    if not isinstance(block, np.ndarray):
        raise ValueError(
            f"expert block must be a numpy array, got {type(block).__name__}; "
            "use as_numpy_block() for a torch tensor"
        )
    fmt = block_format(block)
    if block.ndim != 1 or not block.flags.c_contiguous:
        raise ValueError(f"expert block must be 1-D and contiguous, got shape {block.shape}")
    if block.size != 3 * hidden * inter:
        raise ValueError(
            f"expert block has {block.size} elements; hidden={hidden}, inter={inter} "
            f"needs 3 * H * I = {3 * hidden * inter}"
        )
    return fmt


def infer_inter(block: np.ndarray, hidden: int) -> int:
    """Intermediate size I of a block of 3 * H * I elements; ValueError if it does not divide."""
    if hidden <= 0 or block.size % (3 * hidden):
        raise ValueError(f"expert block of {block.size} elements is not 3 * H * I for hidden={hidden}")
    return block.size // (3 * hidden)


def block_matrices(block: np.ndarray, hidden: int, inter: int) -> tuple[np.ndarray, np.ndarray]:
    """Views (gate_up [2I, H], down [H, I]) of a block, no copy."""
    split = 2 * inter * hidden
    return block[:split].reshape(2 * inter, hidden), block[split:].reshape(hidden, inter)
