"""Page-locked host memory for the expert store, allocated once and at its exact size.

torch's pinned allocator rounds every request up to a power of two, so a 21 GiB
store would page-lock 32 GiB. Instead the memory is a plain host allocation
(a numpy array of exactly the bytes needed, page-aligned) registered in place
with ``cudaHostRegister`` through torch's own cudart bindings (cupy's runtime
when those lack it). If registering fails for any reason the store falls back,
with a warning that says what it costs, to torch's pinned allocator and then
to plain pageable memory.

Lifetime: the torch tensor is a view of the numpy array (torch storages keep
the array alive), and the registration is undone when the array itself dies,
i.e. after the last tensor, view or slice of it is gone; ``PinnedBuffer.unpin``
undoes it earlier, explicitly and idempotently.
"""

from __future__ import annotations

import math
import warnings
import weakref

import numpy as np
import torch

PAGE = 4096
_PORTABLE = 1   # cudaHostRegisterPortable: page-locked for every CUDA context (what torch uses)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def cuda_ready() -> bool:
    """Whether a CUDA device is usable (registration needs one)."""
    return torch.cuda.is_available()


def _cupy_runtime():
    try:
        import cupy
    except ImportError:
        return None
    return cupy.cuda.runtime


def host_register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister(ptr, nbytes, portable): 0 on success, else the CUDA error code."""
    cudart = torch.cuda.cudart()
    if hasattr(cudart, "cudaHostRegister"):
        return int(cudart.cudaHostRegister(ptr, nbytes, _PORTABLE))
    runtime = _cupy_runtime()
    if runtime is None:
        raise RuntimeError("torch's cudart bindings lack cudaHostRegister and cupy is not installed")
    try:
        runtime.hostRegister(ptr, nbytes, _PORTABLE)
    except runtime.CUDARuntimeError as err:
        return int(getattr(err, "status", -1))
    return 0


def host_unregister(ptr: int) -> int:
    """cudaHostUnregister(ptr): 0 on success, else the CUDA error code."""
    cudart = torch.cuda.cudart()
    if hasattr(cudart, "cudaHostUnregister"):
        return int(cudart.cudaHostUnregister(ptr))
    runtime = _cupy_runtime()
    try:
        runtime.hostUnregister(ptr)
    except runtime.CUDARuntimeError as err:
        return int(getattr(err, "status", -1))
    return 0


def torch_pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch's pinned allocator (rounds the page-locked size up to a power of two)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _unregister_quietly(ptr: int, unregister, devices: set[int]) -> None:
    """Finalizer: undo a registration with ``unregister``; never raises (it may run inside the garbage collector).
    ``devices``: the CUDA devices whose streams copy from the memory (the current one when none was named)."""
    try:
        if torch.cuda.is_initialized():
            # A copy from this memory may still be queued on a copier's stream; unregistering (and then
            # freeing) under it would corrupt it, so wait for every device that copies from it first.
            for device in sorted(devices) or [torch.cuda.current_device()]:
                torch.cuda.synchronize(device)
        code = unregister(ptr)
    except Exception as err:  # noqa: BLE001 - a finalizer must not raise
        warnings.warn(f"cudaHostUnregister failed: {err}", RuntimeWarning, stacklevel=2)
        return
    if code != 0:
        warnings.warn(f"cudaHostUnregister returned CUDA error {code}", RuntimeWarning, stacklevel=2)


class PinnedBuffer:
    """An uninitialised host tensor of ``shape`` and ``dtype`` and how it is page-locked.

    ``pinning`` is 'registered' (exact-size memory registered with cudaHostRegister),
    'torch' (torch's pinned allocator) or 'none' (pageable). ``unpin()`` undoes a
    registration now; it is idempotent, and the memory stays valid (pageable) for as
    long as any view of it exists.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.nbytes = math.prod(self.shape) * dtype.itemsize
        self._finalizer: weakref.finalize | None = None
        self._devices: set[int] = set()     # CUDA device indices whose streams copy from this memory
        self.tensor, self.pinning = self._allocate()

    @property
    def pinned(self) -> bool:
        return self.pinning != "none"

    def _allocate(self) -> tuple[torch.Tensor, str]:
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=self.dtype), "none"
        if not cuda_ready():
            return self._fallback("no CUDA device is available")
        return self._registered()

    def _registered(self) -> tuple[torch.Tensor, str]:
        # Over-allocate by a page so the registered range starts on a page boundary.
        raw = np.empty(self.nbytes + PAGE, dtype=np.uint8)
        offset = (-raw.ctypes.data) % PAGE
        array = raw[offset: offset + self.nbytes]
        ptr = array.ctypes.data
        try:
            code = host_register(ptr, self.nbytes)
        except Exception as err:  # noqa: BLE001 - any failure falls back, with a warning
            return self._fallback(f"cudaHostRegister raised {type(err).__name__}: {err}")
        if code != 0:
            return self._fallback(f"cudaHostRegister returned CUDA error {code}")
        # Unregister when the base array dies: it outlives every view, since torch
        # storages made by from_numpy hold the array (and the array holds ``raw``).
        self._finalizer = weakref.finalize(raw, _unregister_quietly, ptr, host_unregister, self._devices)
        self._finalizer.atexit = False  # at exit the process frees it; CUDA may be gone already
        tensor = torch.from_numpy(array).view(self.dtype).view(self.shape)
        return tensor, "registered"

    def _fallback(self, reason: str) -> tuple[torch.Tensor, str]:
        if cuda_ready():
            reserved = 1 << (self.nbytes - 1).bit_length()
            try:
                tensor = torch_pinned_empty(self.shape, self.dtype)
            except Exception as err:  # noqa: BLE001
                reason += f"; torch's pinned allocator failed too ({type(err).__name__}: {err})"
            else:
                warnings.warn(f"exact-size pinning failed ({reason}); pinning {_gib(self.nbytes)} with torch's "
                              f"allocator reserves {_gib(reserved)} of page-locked memory", RuntimeWarning,
                              stacklevel=4)
                return tensor, "torch"
        warnings.warn(f"{_gib(self.nbytes)} of host memory left unpinned ({reason}): host-to-device copies are "
                      "synchronous and slower", RuntimeWarning, stacklevel=4)
        return torch.empty(self.shape, dtype=self.dtype), "none"

    def copied_by(self, device: torch.device) -> None:
        """Copies from this memory run on ``device``'s streams: unpinning waits for that device."""
        if device.type == "cuda":
            self._devices.add(torch.device(device).index if device.index is not None else torch.cuda.current_device())

    def unpin(self) -> None:
        """Undo the registration now (idempotent). Copies from the memory are then synchronous."""
        if self._finalizer is not None:
            self._finalizer()  # runs at most once, also if the array dies later
        self.pinning = "none"   # torch-pinned memory stays page-locked, but callers must treat it as pageable now

    @property
    def registered(self) -> bool:
        """True while a cudaHostRegister registration of this buffer is in force."""
        return self._finalizer is not None and self._finalizer.alive


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    """An uninitialised page-locked host tensor and how it was pinned ('registered', 'torch' or 'none')."""
    buffer = PinnedBuffer(shape, dtype)
    return buffer.tensor, buffer.pinning


__all__ = ["PinnedBuffer", "pinned_empty"]
