"""SimulatedLink: the simulator's copier, a host-to-device link on a simulated clock.

It answers every call the call protocol and the residency make of a copier
(a CopyEngine on a real device), so a replay drives the runtime's own copy-in
path. Copies move no bytes; each takes ``copy_s`` seconds of link time. Like
the CopyEngine, the link serves demand copies before prefetches (a prefetch
is split into small chunks on the device, so a demand copy waits behind next
to nothing): at any moment it works on the oldest demand copy, else the oldest
prefetch. A prefetch not yet started can be cancelled; one the layer needs now
is expedited (its rest becomes a demand copy). The simulator moves the clock
with ``advance`` by each call's duration. With ``copy_s`` 0 (no cost model)
every copy lands at once.
"""

from __future__ import annotations

from collections import OrderedDict


class SimulatedLink:
    """Counts the copies a replay makes (``copies``, cancelled ones not counted; ``demand`` of them for misses)
    and times them."""

    def __init__(self, copy_s: float = 0.0, bytes_per_expert: int = 0):
        self.copy_s = float(copy_s)
        self.bytes_per_expert = int(bytes_per_expert)
        self.now = 0.0
        self.copies = 0
        self.demand = 0
        self._demand: OrderedDict[int, float] = OrderedDict()     # key -> link seconds still to go
        self._prefetch: OrderedDict[int, float] = OrderedDict()
        self._slot_key: dict[int, int] = {}                        # slot -> the key last copied into it
        self._key_slot: dict[int, int] = {}

    # -- the copier's calls ------------------------------------------------------------------------------------
    def copy(self, key: int, slot: int) -> None:
        self.copies += 1
        self.demand += 1
        self._start(key, slot, self._demand)

    def prefetch(self, key: int, slot: int) -> None:
        self.copies += 1
        self._start(key, slot, self._prefetch)

    def _start(self, key: int, slot: int, queue: OrderedDict) -> None:
        self._demand.pop(key, None)
        self._prefetch.pop(key, None)
        old = self._key_slot.pop(key, None)
        if old is not None and self._slot_key.get(old) == key:
            del self._slot_key[old]
        self._slot_key[slot] = key
        self._key_slot[key] = slot
        if self.copy_s > 0:
            queue[key] = self.copy_s

    def cancel(self, key: int) -> bool:
        """Drop a prefetch that has not started; one under way lands."""
        if self._prefetch.get(key) == self.copy_s and self.copy_s > 0:
            del self._prefetch[key]
            self.copies -= 1      # it moved no byte
            return True
        return False

    def expedite(self, key: int) -> bool:
        if key not in self._prefetch:
            return False
        self._demand[key] = self._prefetch.pop(key)
        return True

    def busy_keys(self) -> set[int]:
        return set(self._demand) | set(self._prefetch)

    def backlog_bytes(self) -> int:
        """Demand bytes still to go: what a new demand copy waits behind."""
        if self.copy_s <= 0:
            return 0
        return int(sum(self._demand.values()) / self.copy_s * self.bytes_per_expert)

    def ready_bytes(self, slot: int) -> int:
        """Bytes the link moves before the copy into ``slot`` lands once expedited: the demand copies
        ahead of it and what is left of it."""
        key = self._slot_key.get(slot)
        left = self._demand.get(key, self._prefetch.get(key, 0.0))
        if self.copy_s <= 0 or left == 0.0:
            return 0
        ahead = sum(s for k, s in self._demand.items() if k != key)
        return int((ahead + left) / self.copy_s * self.bytes_per_expert)

    def landed(self, slot: int) -> bool:
        key = self._slot_key.get(slot)
        return key is None or (key not in self._demand and key not in self._prefetch)

    def begin_read(self, slot: int, key: int) -> None:
        pass     # the plan already waited for the copy (its ready time)

    def end_read(self, slot: int) -> None:
        pass

    def pump(self) -> None:
        pass

    # -- the clock ---------------------------------------------------------------------------------------------
    def idle(self) -> bool:
        """Nothing on the link or queued for it."""
        return not self._demand and not self._prefetch

    def pending_bytes(self) -> int:
        """Bytes started or queued: when a prefetch queued now would land, in link time."""
        if self.copy_s <= 0:
            return 0
        return int((sum(self._demand.values()) + sum(self._prefetch.values())) / self.copy_s * self.bytes_per_expert)

    def synchronize(self) -> None:
        """Land everything on the link (the disk tier's last resort before reusing a host row)."""
        self._demand.clear()
        self._prefetch.clear()

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of link time pass: demand copies first, then prefetches, oldest first."""
        self.now += seconds
        left = seconds
        for queue in (self._demand, self._prefetch):
            while queue and left > 0:
                key, remaining = next(iter(queue.items()))
                if remaining > left:
                    queue[key] = remaining - left
                    return
                left -= remaining
                del queue[key]
