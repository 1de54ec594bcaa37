"""Page-locked host memory for the expert store, allocated once.

torch's pinned allocator rounds every request up to a power of two, so a
90 GB store would ask for 128 GB of page-locked memory. With cupy (the `gpu`
extra) the store is instead a plain allocation registered in place with
cudaHostRegister, costing exactly its size; without cupy it falls back to
torch's pinned allocator.
"""

from __future__ import annotations

import weakref

import torch


def _register_with_cupy(tensor: torch.Tensor) -> bool:
    try:
        import cupy
    except ImportError:
        return False
    runtime = cupy.cuda.runtime
    ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    runtime.hostRegister(ptr, size, 0)  # cudaHostRegisterDefault: portable and mapped under UVA
    weakref.finalize(tensor, runtime.hostUnregister, ptr)  # unregister before the memory is freed
    return True


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    """An uninitialised page-locked host tensor and how it was pinned ('registered' or 'torch')."""
    tensor = torch.empty(shape, dtype=dtype)
    if tensor.numel() and _register_with_cupy(tensor):
        return tensor, "registered"
    return torch.empty(shape, dtype=dtype, pin_memory=True), "torch"
