"""ExpertCache: residency decisions over ExpertSlots, made by a CachePolicy."""

from __future__ import annotations

from collections.abc import Collection

from .policies import CachePolicy
from .slots import ExpertSlots


class ExpertCache:
    """Which experts hold device slots; hands out a slot for a miss."""

    def __init__(self, slots: ExpertSlots, policy: CachePolicy):
        self.slots = slots
        self.policy = policy

    def lookup(self, key: int) -> int:
        """Slot of ``key`` or -1."""
        return self.slots.lookup(key)

    def touch(self, key: int) -> None:
        self.policy.touch(key)

    def acquire(self, key: int, locked: Collection[int] = ()) -> tuple[int, int] | None:
        """A slot for missing expert ``key``: a free one, else the policy's victim
        among residents not in ``locked``. Returns (slot, evicted key or -1), or
        None when every slot is locked."""
        if self.slots.has_free():
            slot, evicted = self.slots.take_free(), -1
        else:
            candidates = [k for k in self.slots.resident() if k not in locked]
            if not candidates:
                return None
            evicted = self.policy.victim(candidates)
            self.policy.remove(evicted)
            slot = self.slots.evict(evicted)
        self.slots.assign(key, slot)
        self.policy.admit(key)
        return slot, evicted
