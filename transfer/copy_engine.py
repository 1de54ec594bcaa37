"""CopyEngine: host block -> device slot copies on a dedicated stream, ordered by events."""

from __future__ import annotations

import torch

from .host_store import HostExpertStore


class CopyEngine:
    """Demand copies of expert blocks into device slot buffers.

    On CUDA every copy runs on ``self.stream``; ``ready[slot]`` is recorded after
    the copy and the compute stream waits on it before reading the slot;
    ``released[slot]`` is recorded on the compute stream after the last kernel that
    reads the slot, and the copy stream waits on it before overwriting the slot.
    On CPU the copy is a plain synchronous memcpy and the events are absent.
    """

    def __init__(self, store: HostExpertStore, buffers: torch.Tensor):
        self.store = store
        self.buffers = buffers  # [S, 3HI] on the device
        self.cuda = buffers.is_cuda
        num_slots = buffers.shape[0]
        if self.cuda:
            self.stream = torch.cuda.Stream(device=buffers.device)
            self.ready = [torch.cuda.Event() for _ in range(num_slots)]
            self.released = [torch.cuda.Event() for _ in range(num_slots)]
            self._written = [False] * num_slots
            self._read = [False] * num_slots

    def copy(self, key: int, slot: int) -> None:
        """Start copying expert ``key`` into ``slot``."""
        src = self.store.block(key)
        if not self.cuda:
            self.buffers[slot].copy_(src)
            return
        with torch.cuda.stream(self.stream):
            if self._read[slot]:
                self.stream.wait_event(self.released[slot])  # never overwrite what queued compute still reads
            self.buffers[slot].copy_(src, non_blocking=self.store.pinned)
            self.ready[slot].record(self.stream)
        self._written[slot] = True

    def acquire(self, slot: int) -> None:
        """Make the current (compute) stream wait until ``slot``'s last copy has landed."""
        if self.cuda and self._written[slot]:
            torch.cuda.current_stream(self.buffers.device).wait_event(self.ready[slot])

    def release(self, slot: int) -> None:
        """Mark the end of the compute that reads ``slot`` (queued on the current stream)."""
        if self.cuda:
            self.released[slot].record(torch.cuda.current_stream(self.buffers.device))
            self._read[slot] = True

    def synchronize(self) -> None:
        if self.cuda:
            self.stream.synchronize()
