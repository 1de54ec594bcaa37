"""CopyEngine: host block -> device slot copies, demand before prefetch, ordered by events.

On CUDA, demand copies go on a high-priority stream as soon as they are asked
for; prefetches wait in a host-side queue and at most ``max_prefetch_inflight``
of them are on the low-priority prefetch stream at once, so a demand copy never
queues behind a long train of prefetches, and a prefetch that stops being useful
is dropped before it starts. Per slot, ``ready[slot]`` is recorded after the
copy into it and the compute stream waits on it before reading; ``released[slot]``
is recorded on the compute stream after the last kernel that reads the slot, and
every copy into the slot waits on it first (a slot is never overwritten while
queued compute still reads it). On CPU a copy is a synchronous memcpy done when
the copy is submitted.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .host_store import HostExpertStore

DEMAND, PREFETCH = 0, 1


class CopyEngine:
    def __init__(self, store: HostExpertStore, buffers: torch.Tensor, max_prefetch_inflight: int = 2):
        self.store = store
        self.buffers = buffers  # [S, 3HI] on the device
        self.cuda = buffers.is_cuda
        self.max_prefetch_inflight = max_prefetch_inflight
        self.queued: OrderedDict[int, int] = OrderedDict()   # prefetch key -> slot, not yet submitted
        self.inflight: dict[int, int] = {}                   # prefetch key -> slot, submitted, maybe running
        num_slots = buffers.shape[0]
        if self.cuda:
            low, high = torch.cuda.Stream.priority_range()
            self.demand_stream = torch.cuda.Stream(device=buffers.device, priority=high)
            self.prefetch_stream = torch.cuda.Stream(device=buffers.device, priority=low)
            self.ready = [torch.cuda.Event() for _ in range(num_slots)]
            self.released = [torch.cuda.Event() for _ in range(num_slots)]
        self._written = [False] * num_slots
        self._read = [False] * num_slots
        self.timing = False                      # when set, every CUDA copy records start/end events
        self._timed: list[tuple] = []

    # -- submitting -------------------------------------------------------------------------
    def copy(self, key: int, slot: int) -> None:
        """Demand copy: starts now, ahead of every queued prefetch."""
        self.queued.pop(key, None)
        self._submit(key, slot, DEMAND)

    def prefetch(self, key: int, slot: int) -> None:
        """Queue a low-priority copy; it starts when fewer than the limit are in flight."""
        self.queued[key] = slot
        self.pump()

    def pump(self) -> None:
        """Retire finished prefetches and start queued ones up to the in-flight limit."""
        if self.cuda:
            done = [k for k, s in self.inflight.items() if self.ready[s].query()]
            for key in done:
                del self.inflight[key]
        else:
            self.inflight.clear()
        while self.queued and len(self.inflight) < self.max_prefetch_inflight:
            key, slot = self.queued.popitem(last=False)
            self._submit(key, slot, PREFETCH)
            self.inflight[key] = slot

    def cancel(self, key: int) -> bool:
        """Drop a queued prefetch that has not started; True if it was dropped."""
        return self.queued.pop(key, None) is not None

    def is_queued(self, key: int) -> bool:
        return key in self.queued

    def _submit(self, key: int, slot: int, priority: int) -> None:
        src = self.store.block(key)
        if not self.cuda:
            self.buffers[slot].copy_(src)
            self._written[slot] = True
            return
        stream = self.demand_stream if priority == DEMAND else self.prefetch_stream
        with torch.cuda.stream(stream):
            if self._read[slot]:
                stream.wait_event(self.released[slot])  # never overwrite what queued compute still reads
            start = self._timing_event(stream)
            self.buffers[slot].copy_(src, non_blocking=self.store.pinned)
            self.ready[slot].record(stream)
            if start is not None:
                self._timed.append((start, self._timing_event(stream)))
        self._written[slot] = True

    def _timing_event(self, stream):
        if not self.timing:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def copy_seconds(self) -> float:
        """Total device time of the timed copies so far (synchronizes); resets the record."""
        self.synchronize()
        total = sum(start.elapsed_time(end) for start, end in self._timed) / 1e3
        self._timed.clear()
        return total

    # -- consuming --------------------------------------------------------------------------
    def ready_now(self, slot: int) -> bool:
        """True when the last copy into ``slot`` has landed (no wait)."""
        return not self.cuda or not self._written[slot] or self.ready[slot].query()

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
            self.demand_stream.synchronize()
            self.prefetch_stream.synchronize()
