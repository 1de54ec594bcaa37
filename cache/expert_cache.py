"""ExpertCache: residency decisions over ExpertSlots, made by a CachePolicy within slot pools."""

from __future__ import annotations

from collections.abc import Collection

from .base import CachePolicy
from .pools import SlotPools
from .slots import ExpertSlots


class ExpertCache:
    """Which experts hold device slots; hands out a slot for a miss.

    ``pools`` partitions the slots (default: one shared pool). A key whose pool
    is below capacity takes a free slot; a full pool evicts among its own
    residents, as its policy chooses.
    """

    def __init__(self, slots: ExpertSlots, policy: CachePolicy, pools: SlotPools | None = None):
        self.slots = slots
        self.policy = policy
        self.pools = pools or SlotPools.shared(slots.num_slots)
        if self.pools.num_slots > slots.num_slots:
            raise ValueError(f"pools need {self.pools.num_slots} slots but only {slots.num_slots} exist")
        self._residents: list[set[int]] = []
        self._frees_seen = -1
        self._sync()
        policy.bind_pools(self.pools)

    def _sync(self) -> None:
        """Rebuild the per-pool resident sets when slots were freed behind the cache's back."""
        if self._frees_seen == self.slots.frees:
            return
        self._residents = [set() for _ in range(self.pools.num_pools)]
        for key in self.slots.resident():
            self._residents[self.pools.pool_of(key)].add(key)
        self._frees_seen = self.slots.frees

    def lookup(self, key: int) -> int:
        """Slot of ``key`` or -1."""
        return self.slots.lookup(key)

    def touch(self, key: int) -> None:
        self.policy.touch(key)

    def residents(self, pool: int = 0) -> set[int]:
        """Keys resident in ``pool`` (a copy)."""
        self._sync()
        return set(self._residents[pool])

    def remove(self, key: int) -> int:
        """Drop resident ``key`` (e.g. a cancelled prefetch) and free its slot. Returns the slot, or -1
        when ``key`` is not resident (nothing to free)."""
        if self.slots.lookup(key) < 0:
            return -1
        self._sync()
        self._residents[self.pools.pool_of(key)].discard(key)
        self.policy.remove(key)
        slot = self.slots.free(key)
        self._frees_seen = self.slots.frees
        return slot

    def place(self, key: int, locked: Collection[int] = (), evict: bool = True,
                busy: Collection[int] = ()) -> tuple[int, int] | None:
        """A slot for missing expert ``key``: a free one while its pool is below
        capacity, else the policy's victim among the pool's residents not in
        ``locked``, those not in ``busy`` (copies in flight) first. Returns
        (slot, evicted key or -1), or None when every resident of the pool is
        locked, or the pool is full and ``evict`` is False."""
        self._sync()
        pool = self.pools.pool_of(key)
        residents = self._residents[pool]
        if len(residents) < self.pools.capacity[pool]:
            self.policy.on_miss(key)
            slot, evicted = self.slots.take_free(), -1
        else:
            candidates = list(residents.difference(locked)) if evict else []
            if not candidates:
                return None
            idle = [c for c in candidates if c not in busy] if busy else candidates
            candidates = idle or candidates
            self.policy.on_miss(key)
            evicted = self.policy.victim(candidates)
            self.policy.remove(evicted)
            residents.discard(evicted)
            slot = self.slots.evict(evicted)
        self.slots.assign(key, slot)
        residents.add(key)
        self.policy.admit(key)
        return slot, evicted
