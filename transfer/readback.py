"""Device -> host readback: everything the host needs from one MoE layer in one copy.

On CUDA, each ``.tolist()``, ``.cpu()`` or ``int(tensor)`` is a host
synchronization. The engine instead packs what the host needs from a layer
(expert token counts, router scores, the predictor's rankings) into one float32
device tensor, copies it with one non-blocking copy into a page-locked buffer
and waits on one event. On CPU the packed tensor is already host memory.

How a host thread waits on such an event is one setting, ``host_wait``: 'spin'
(CUDA's default event: the thread polls, the lowest latency, one core busy while
it waits) or 'block' (the driver puts the thread to sleep until the event
completes, leaving the core to the CPU experts' threads). ``host_event`` makes
every event the host waits on.
"""

from __future__ import annotations

import numpy as np
import torch

HOST_WAITS = ("spin", "block")


def host_event(device: torch.device, host_wait: str = "spin") -> torch.cuda.Event | None:
    """An event the host thread waits on for device work, waited on as ``host_wait`` says (one of
    HOST_WAITS); None off CUDA, where the work is done when it returns."""
    if host_wait not in HOST_WAITS:
        raise ValueError(f"host_wait must be one of {HOST_WAITS}, got {host_wait!r}")
    return torch.cuda.Event(blocking=host_wait == "block") if device.type == "cuda" else None


class HostReadback:
    """A growing page-locked buffer and an event (waited on as ``host_wait`` says); ``read`` returns host
    copies of the parts."""

    def __init__(self, device: torch.device, host_wait: str = "spin"):
        self.device = device
        self.cuda = device.type == "cuda"
        self._buffer: torch.Tensor | None = None   # [N] float32, page-locked
        self._event = host_event(device, host_wait)
        self.reads = 0

    def set_wait(self, host_wait: str) -> None:
        """Wait on later reads as ``host_wait`` says (each read records its event afresh)."""
        self._event = host_event(self.device, host_wait)

    def _staging(self, numel: int) -> torch.Tensor:
        self._buffer = grown(self._buffer, numel, pin=True)
        return self._buffer[:numel]

    def read(self, parts: list[torch.Tensor]) -> list[np.ndarray]:
        """Flat host arrays of ``parts`` (device tensors of any shape), in order: float32 copies on CUDA,
        read-only views on CPU (float32 for half types, else the tensor's dtype)."""
        self.reads += 1
        if not self.cuda:   # already host memory: views, no copy
            return [_host_array(p) for p in parts]
        sizes = [p.numel() for p in parts]
        flat = torch.cat([p.reshape(-1).float() for p in parts]) if parts else torch.empty(0)   # [N]
        staging = self._staging(flat.numel())
        staging.copy_(flat, non_blocking=True)
        self._event.record(torch.cuda.current_stream(self.device))
        self._event.synchronize()   # the one host sync of the layer: the plan needs these numbers
        host = staging.numpy().copy()   # the staging buffer is reused by the next layer
        return np.split(host, np.cumsum(sizes)[:-1]) if parts else []


def _host_array(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a CPU tensor (float32 for the floating dtypes numpy lacks)."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.float()
    return flat.numpy()


def grown(buffer: torch.Tensor | None, numel: int, pin: bool) -> torch.Tensor:
    """Host scratch reused from layer to layer: ``buffer`` when it holds ``numel`` float32 elements, else
    a new flat one of the next power of two (page-locked when ``pin``); never shrunk."""
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(1 << max(10, (numel - 1).bit_length()), dtype=torch.float32, pin_memory=pin)
    return buffer
