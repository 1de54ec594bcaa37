"""SimulatedLink: the simulator's copier. Copies move no bytes and land at once; the link counts them.

It answers every call the call protocol and the residency make of a copier
(a CopyEngine on a real device), so a replay drives the runtime's own copy-in
path. A replay has no queue: a prefetch counts as started when issued, so it
is never cancelled, and nothing is ever in flight when a layer plans.
"""

from __future__ import annotations


class SimulatedLink:
    """Counts the copies a replay starts: ``copies`` in all, ``demand`` of them for misses."""

    def __init__(self) -> None:
        self.copies = 0
        self.demand = 0

    def copy(self, key: int, slot: int) -> None:
        self.copies += 1
        self.demand += 1

    def prefetch(self, key: int, slot: int) -> None:
        self.copies += 1

    def cancel(self, key: int) -> bool:
        return False           # started when issued: nothing queued to cancel

    def expedite(self, key: int) -> bool:
        return False

    def busy_keys(self) -> set[int]:
        return set()

    def backlog_bytes(self) -> int:
        return 0

    def landed(self, slot: int) -> bool:
        return True

    def begin_read(self, slot: int, key: int) -> None:
        pass

    def end_read(self, slot: int) -> None:
        pass

    def pump(self) -> None:
        pass
