"""CopyEngine: host block -> device slot copies, demand before prefetch, ordered by events.

Demand copies go on a high-priority stream as soon as they are asked for, in one
piece. Prefetches wait in a host-side queue and are split into chunks of
``chunk_bytes``; at most ``max_prefetch_inflight`` chunks are on the low-priority
prefetch stream at once. Stream priority orders kernels, not the copy engine, so
this is what lets a demand copy go first on the link: it waits behind at most a
few chunks, never behind whole queued experts. A prefetch that stops being useful
is dropped before its remaining chunks start.

Ordering rules, per slot (one place):
- ``ready[slot]`` is recorded after every write into the slot; the compute stream
  waits on it before reading (``begin_read``);
- ``released[slot]`` is recorded on the compute stream after the last kernel that
  reads the slot (``end_read``); every write into the slot waits on it first
  (write-after-read);
- every write into the slot also waits on ``ready[slot]``, the previous write,
  whichever stream it was on (write-after-write: a late prefetch chunk never
  lands over a newer demand copy, and an expert's chunks land before it is read).

The streams and events come from a backend (``transfer.streams``): CUDA's own,
``immediate`` copies on CPU, or ``deferred`` CPU copies that land late and out
of order within these dependencies, which is how CI tests the rules.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from .host_store import HostExpertStore
from .streams import make_backend

DEMAND, PREFETCH = 0, 1
DEFAULT_CHUNK_BYTES = 32 * 2**20


class CopyOrderError(AssertionError):
    """A slot was read while it did not hold the expert it is mapped to (deferred backend check)."""


@dataclass
class _Queued:
    """A prefetch not yet fully on the stream: elements [offset, numel) still to copy."""

    slot: int
    offset: int = 0


class CopyEngine:
    def __init__(self, store: HostExpertStore, buffers: torch.Tensor, backend: str | None = None, seed: int = 0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_prefetch_inflight: int = 2):
        self.store = store
        self.buffers = buffers  # [S, 3HI] on the device
        name = backend or ("cuda" if buffers.is_cuda else "immediate")
        self.backend = make_backend(name, buffers.device, seed)
        self.cuda = name == "cuda"
        if self.cuda:
            store.copied_by(buffers.device)     # unpinning the store waits for this device's streams
        self.max_prefetch_inflight = max_prefetch_inflight
        self.chunk_numel = max(1, chunk_bytes // max(1, buffers.element_size()))
        num_slots, self.block_numel = buffers.shape
        self.demand_stream = self.backend.stream(high_priority=True)
        self.prefetch_stream = self.backend.stream(high_priority=False)
        self.ready = [self.backend.event() for _ in range(num_slots)]
        self.released = [self.backend.event() for _ in range(num_slots)]
        self.queued: OrderedDict[int, _Queued] = OrderedDict()   # prefetch key -> remaining work
        self._inflight: deque[tuple] = deque()  # (event, key, bytes, priority) of submitted copies
        self._inflight_bytes = 0
        self._prefetch_chunks = 0                                 # prefetch chunks among them
        self._written = [False] * num_slots
        self._read = [False] * num_slots
        self._check = self.backend.tracks_contents
        self._landed_at_once = self.backend.lands_at_once
        self._content: list[tuple[int, set]] = [(-1, set())] * num_slots   # sim: (key, landed ranges) per slot
        self.timing = False                      # when set, every CUDA copy records start/end events
        self._timed: list[tuple] = []
        self.closed = False

    # -- submitting -------------------------------------------------------------------------
    def copy(self, key: int, slot: int) -> None:
        """Demand copy into ``slot``: starts now, ahead of every queued prefetch."""
        queued = self.queued.pop(key, None)
        offset = 0
        if queued is not None:
            if queued.slot != slot:
                raise ValueError(f"expert {key} is queued for slot {queued.slot}, demanded into slot {slot}")
            offset = queued.offset
        self._write(key, slot, offset, self.block_numel, DEMAND)

    def expedite(self, key: int) -> bool:
        """A queued prefetch is needed now: its remaining chunks become one demand copy."""
        queued = self.queued.get(key)
        if queued is None:
            return False
        self.copy(key, queued.slot)
        return True

    def prefetch(self, key: int, slot: int) -> None:
        """Queue a low-priority copy; its chunks start as earlier ones land."""
        if key in self.queued:
            raise ValueError(f"expert {key} already has a queued prefetch")
        self.queued[key] = _Queued(slot)
        self.pump()

    def pump(self) -> None:
        """Retire landed copies and start queued prefetch chunks up to the in-flight limit."""
        if not self.queued:
            return
        self._retire()
        numel = self.block_numel
        while self.queued:
            if self._prefetch_chunks >= self.max_prefetch_inflight:
                self._retire()
                if self._prefetch_chunks >= self.max_prefetch_inflight:
                    break
            key, queued = next(iter(self.queued.items()))
            end = min(numel, queued.offset + self.chunk_numel)
            self._write(key, queued.slot, queued.offset, end, PREFETCH)
            queued.offset = end
            if end == numel:
                del self.queued[key]

    def cancel(self, key: int) -> bool:
        """Drop a queued prefetch's chunks that have not started. True if one was dropped: the slot then
        does not hold the expert (chunks that did start still land; later writes wait for them)."""
        return self.queued.pop(key, None) is not None

    def is_queued(self, key: int) -> bool:
        return key in self.queued

    def busy_keys(self) -> set[int]:
        """Experts with a copy queued or on a stream (evicted last)."""
        self._retire()
        return set(self.queued) | {item[1] for item in self._inflight}

    def backlog_bytes(self) -> int:
        """Bytes on the streams that have not landed: what a new demand copy waits behind."""
        self._retire()
        return self._inflight_bytes

    def ready_bytes(self, slot: int) -> int:
        """Bytes the link moves before the copy into ``slot`` lands once expedited (an upper bound: the
        bytes on the streams and the whole block); 0 when it has landed."""
        if self.landed(slot):
            return 0
        return self.backlog_bytes() + self.block_numel * self.buffers.element_size()

    def pending_bytes(self) -> int:
        """Bytes on the streams or queued for them: when a prefetch queued now would land, in link time."""
        return self.backlog_bytes() + self.queued_bytes()

    def idle(self) -> bool:
        """Nothing on the streams and nothing queued."""
        return self.pending_bytes() == 0

    def queued_bytes(self) -> int:
        numel = self.block_numel
        return sum(numel - q.offset for q in self.queued.values()) * self.buffers.element_size()

    def _write(self, key: int, slot: int, lo: int, hi: int, priority: int) -> None:
        """Copy elements [lo, hi) of ``key``'s block into ``slot`` after the slot's reader and writer."""
        if self.closed:
            raise RuntimeError("copy engine is closed")
        if self._landed_at_once:    # immediate CPU backend: nothing is ever in flight
            self.buffers[slot, lo:hi].copy_(self.store.block(key)[lo:hi])
            return
        stream = self.demand_stream if priority == DEMAND else self.prefetch_stream
        if self._read[slot]:
            stream.wait_event(self.released[slot])   # write-after-read: queued compute still reads the slot
        if self._written[slot]:
            stream.wait_event(self.ready[slot])      # write-after-write: the slot's previous copy lands first
        start = self._timing_event(stream)
        src, dst = self.store.block(key)[lo:hi], self.buffers[slot, lo:hi]
        self.backend.copy(stream, dst, src, self._landed_fn(key, slot, lo, hi) if self._check else None)
        self.ready[slot].record(stream)
        if start is not None:
            self._timed.append((start, self._timing_event(stream)))
        self._written[slot] = True
        nbytes = (hi - lo) * self.buffers.element_size()
        done = self.backend.event()
        done.record(stream)
        self._inflight.append((done, key, nbytes, priority))
        self._inflight_bytes += nbytes
        self._prefetch_chunks += priority == PREFETCH

    def _retire(self) -> None:
        """Forget submitted copies that have landed (in any order: two streams)."""
        if not self._inflight:
            return
        keep: deque[tuple] = deque()
        for item in self._inflight:
            if item[0].query():
                self._inflight_bytes -= item[2]
                self._prefetch_chunks -= item[3] == PREFETCH
            else:
                keep.append(item)
        self._inflight = keep

    def _landed_fn(self, key: int, slot: int, lo: int, hi: int):
        def landed() -> None:
            held, ranges = self._content[slot]
            self._content[slot] = (key, (ranges if held == key else set()) | {(lo, hi)})
        return landed

    def _holds(self, slot: int, key: int) -> bool:
        """Sim check: the landed ranges of ``key`` in ``slot`` cover the whole block."""
        held, ranges = self._content[slot]
        end = 0
        for lo, hi in sorted(ranges):
            if lo > end:
                return False
            end = max(end, hi)
        return held == key and end == self.block_numel

    def _timing_event(self, stream):
        if not (self.timing and self.cuda):
            return None
        event = self.backend.event(timing=True)
        event.record(stream)
        return event

    def copy_seconds(self) -> float:
        """Seconds the link was busy with the timed copies so far (synchronizes); resets the record. Copies
        on the demand and prefetch streams overlap, so this is the union of their device intervals (their
        sum would count the shared time twice and understate the link's rate)."""
        self.synchronize()
        if not self._timed:
            return 0.0
        origin = self._timed[0][0]
        intervals = [(origin.elapsed_time(start), origin.elapsed_time(end)) for start, end in self._timed]   # ms
        self._timed.clear()
        return covered_length(intervals) / 1e3

    # -- consuming --------------------------------------------------------------------------
    def landed(self, slot: int) -> bool:
        """True when the last copy into ``slot`` has landed (no wait)."""
        return not self._written[slot] or self.ready[slot].query()

    def begin_read(self, slot: int, key: int | None = None) -> None:
        """Make the compute stream wait until ``slot``'s copies have landed. With ``key`` on a CPU backend,
        also check that the slot then holds all of that expert's bytes."""
        if self._landed_at_once:
            return
        if self._written[slot]:
            self.backend.compute_stream().wait_event(self.ready[slot])
        if self._check and key is not None and not self._holds(slot, key):
            held, ranges = self._content[slot]
            raise CopyOrderError(f"slot {slot} is read as expert {key} but holds expert {held} "
                                 f"(landed ranges {sorted(ranges)} of {self.block_numel} elements)")

    def end_read(self, slot: int) -> None:
        """Mark the end of the compute that reads ``slot`` (queued on the compute stream)."""
        if self._landed_at_once:
            return      # CPU compute is synchronous and copies land when issued: nothing to order
        self.released[slot].record(self.backend.compute_stream())
        self._read[slot] = True

    def synchronize(self) -> None:
        """Wait for every copy on the streams (queued prefetches stay queued)."""
        self.demand_stream.synchronize()
        self.prefetch_stream.synchronize()
        self._retire()

    def close(self) -> None:
        """Drop queued prefetches and wait for every copy already on a stream."""
        if self.closed:
            return
        self.queued.clear()
        self.synchronize()
        self.closed = True


def covered_length(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (overlaps counted once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
