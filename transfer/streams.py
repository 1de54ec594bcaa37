"""Streams and events for the copy engine: CUDA's own, or a CPU stand-in that lands copies late.

The copy engine is written once against a small stream/event interface, the
one torch.cuda offers: ``stream.wait_event(e)``, ``e.record(stream)``,
``e.query()``, ``e.synchronize()``, ``stream.synchronize()``, plus ``copy(stream,
dst, src)`` and the compute stream. Three backends implement it:

- ``cuda``: torch.cuda streams (demand at high priority, prefetch at low) and events.
- ``immediate`` (CPU): every copy lands when it is issued.
- ``deferred`` (CPU, for tests): a copy is queued and lands later, when something
  waits on it, or at random points (seeded), in any order its dependencies allow:
  the previous operation of its stream and the events the stream waited on
  before it. Priorities give no ordering (a GPU's copy engine does not honour
  them either). Code that is right only because copies land at once fails here.

The compute stream on CPU is synchronous: waiting on an event lands what it
covers, and an event recorded on it is complete at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

BACKENDS = ("cuda", "immediate", "deferred")


class _Op:
    """One queued operation of a simulated stream: ``fn`` runs when it lands, after ``deps``."""

    __slots__ = ("fn", "deps", "done")

    def __init__(self, fn: Callable[[], None] | None, deps: list["_Op"]):
        self.fn = fn
        self.deps = deps
        self.done = False


class SimEvent:
    """An event of a simulated stream: complete when the operation it marks has landed."""

    def __init__(self, backend: "SimBackend"):
        self._backend = backend
        self._op: _Op | None = None

    def record(self, stream: "SimStream") -> None:
        self._op = stream._marker()

    def query(self) -> bool:
        self._backend.tick()
        return self._op is None or self._op.done

    def synchronize(self) -> None:
        self._backend.land(self._op)


class SimStream:
    """A FIFO of operations; ``wait_event`` makes the next operation depend on the event."""

    def __init__(self, backend: "SimBackend"):
        self._backend = backend
        self._last: _Op | None = None
        self._waits: list[_Op] = []

    def wait_event(self, event: SimEvent) -> None:
        if event._op is not None and not event._op.done:
            self._waits.append(event._op)

    def _enqueue(self, fn: Callable[[], None] | None) -> _Op:
        deps = [op for op in [self._last, *self._waits] if op is not None and not op.done]
        self._waits = []
        op = _Op(fn, deps)
        self._last = op
        self._backend.submit(op)
        return op

    def _marker(self) -> _Op | None:
        """An operation that completes once everything queued so far on this stream has: the last one
        (it lands after its dependencies), or a new empty one when the stream has waits still to honour."""
        if self._waits:
            return self._enqueue(None)
        return None if self._last is None or self._last.done else self._last

    def synchronize(self) -> None:
        self._backend.land(self._last)
        for op in self._waits:
            self._backend.land(op)


class SimComputeStream:
    """The CPU compute stream: synchronous, so waiting lands and recording completes at once."""

    def __init__(self, backend: "SimBackend"):
        self._backend = backend

    def wait_event(self, event: SimEvent) -> None:
        self._backend.land(event._op)

    def _marker(self) -> None:
        return None

    def synchronize(self) -> None:
        pass


class SimBackend:
    """CPU streams: ``deferred`` queues copies and lands them late in a seeded random order.

    ``lands_at_once``: every copy lands when issued (immediate), so there is nothing to order;
    ``tracks_contents``: the copy engine records which expert's bytes landed in each slot (deferred)."""

    def __init__(self, deferred: bool, seed: int = 0, land_probability: float = 0.3):
        self.name = "deferred" if deferred else "immediate"
        self.deferred = deferred
        self.lands_at_once = not deferred
        self.tracks_contents = deferred
        self._rng = random.Random(seed)
        self.land_probability = land_probability
        self._pending: list[_Op] = []
        self._compute = SimComputeStream(self)

    def stream(self, high_priority: bool) -> SimStream:
        return SimStream(self)

    def event(self, timing: bool = False) -> SimEvent:
        return SimEvent(self)

    def compute_stream(self) -> SimComputeStream:
        return self._compute

    def copy(self, stream: SimStream, dst: torch.Tensor, src: torch.Tensor,
             landed: Callable[[], None] | None = None) -> None:
        def run() -> None:
            dst.copy_(src)
            if landed is not None:
                landed()
        stream._enqueue(run)

    def submit(self, op: _Op) -> None:
        if not self.deferred:
            self._run(op)
            return
        self._pending.append(op)
        self.tick()

    def tick(self) -> None:
        """At random points, land a random number of operations whose dependencies have landed."""
        if not self._pending or self._rng.random() >= self.land_probability:
            return
        for _ in range(self._rng.randint(1, len(self._pending))):
            ready = [op for op in self._pending if all(d.done for d in op.deps)]
            if not ready:
                return
            self.land(self._rng.choice(ready))

    def land(self, op: _Op | None) -> None:
        """Land ``op`` now, after its dependencies (depth-first, in the order declared)."""
        if op is None or op.done:
            return
        stack = [op]
        while stack:
            top = stack[-1]
            waiting = [d for d in top.deps if not d.done]
            if waiting:
                stack.extend(reversed(waiting))
                continue
            stack.pop()
            if not top.done:
                self._run(top)

    def _run(self, op: _Op) -> None:
        if op.fn is not None:
            op.fn()
        op.done = True
        op.fn, op.deps = None, []    # a landed op holds nothing (its closure would keep the engine alive)
        if self.deferred:
            self._pending.remove(op)

    def drain(self) -> None:
        for op in list(self._pending):
            self.land(op)

    @property
    def pending(self) -> int:
        return len(self._pending)


class CudaBackend:
    """torch.cuda streams and events on ``device``."""

    name = "cuda"
    lands_at_once = False
    tracks_contents = False

    def __init__(self, device: torch.device):
        self.device = device
        self._low, self._high = torch.cuda.Stream.priority_range()

    def stream(self, high_priority: bool) -> torch.cuda.Stream:
        return torch.cuda.Stream(device=self.device, priority=self._high if high_priority else self._low)

    def event(self, timing: bool = False) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=timing)

    def compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def copy(self, stream, dst: torch.Tensor, src: torch.Tensor, landed=None) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def tick(self) -> None:
        pass

    def drain(self) -> None:
        torch.cuda.synchronize(self.device)


def make_backend(name: str, device: torch.device, seed: int = 0):
    if name not in BACKENDS:
        raise ValueError(f"copy backend must be one of {BACKENDS}, got {name!r}")
    if (name == "cuda") != (device.type == "cuda"):
        raise ValueError(f"copy backend {name!r} cannot copy into {device} buffers")
    if name == "cuda":
        return CudaBackend(device)
    return SimBackend(deferred=name == "deferred", seed=seed)
