"""SimulatedDisk: the disk reader's calls on a simulated clock, for the simulator's disk tier.

Demand reads complete at once: their time is in the call's plan (the scheduler adds an expert's read
to its copy or CPU time, ``CallProtocol._disk_s``). Prefetch reads queue and progress, one after
another, only in the disk time the calls leave (``advance``); a demand for one still reading charges
its remaining time (``remaining_s``) and completes it.
"""

from __future__ import annotations

from ..transfer.disk import DEMAND, Read


class SimulatedDisk:
    def __init__(self, read_s: float):
        self.read_s = read_s                   # seconds to read one expert
        self._queue: list[list] = []           # [read, seconds left], oldest first
        self.reads = 0

    def submit(self, runs, out, priority: int = DEMAND) -> Read:
        read = Read(runs, out, priority)
        self.reads += 1
        if priority == DEMAND or self.read_s <= 0:
            read.done.set()
        else:
            self._queue.append([read, self.read_s])
        return read

    def remaining_s(self, read: Read, full_s: float) -> float:
        """Seconds until ``read`` lands at the disk's pace (0: landed)."""
        for item in self._queue:
            if item[0] is read:
                return item[1]
        return 0.0

    def promote(self, read: Read) -> None:
        """Needed now: the call's plan charged its remaining time, so it lands."""
        self._queue = [item for item in self._queue if item[0] is not read]
        read.done.set()

    def cancel(self, read: Read) -> bool:
        for item in self._queue:
            if item[0] is read and item[1] >= self.read_s:   # not started
                self._queue = [other for other in self._queue if other is not item]
                read.cancelled = True
                read.done.set()
                self.reads -= 1
                return True
        return False

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of disk time pass: queued prefetch reads progress, oldest first."""
        while self._queue and seconds > 0:
            item = self._queue[0]
            step = min(seconds, item[1])
            item[1] -= step
            seconds -= step
            if item[1] <= 0:
                self._queue.pop(0)
                item[0].done.set()

    def close(self) -> None:
        self._queue.clear()
