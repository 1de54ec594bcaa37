"""ExpertResidency: the one copy-in path into the device expert cache.

Every copy into a slot, for whichever reason (a demand miss, a prefetch, a
CPU-run expert filling a free slot, a preload), goes through ``copy_in``: the
cache picks the slot (a free one, else its policy's victim, experts with a copy
in flight last), the victim's queued prefetch is cancelled so it never lands
over the new expert, the eviction is counted, and the copy engine issues the
copy behind the slot's last reader and writer. ``drop`` undoes a prefetch that
turned out stale, freeing only what is still resident.
"""

from __future__ import annotations

from collections.abc import Collection

from ..cache import ExpertCache
from .stats import OffloadStats

DEMAND, PREFETCH = "demand", "prefetch"


class ExpertResidency:
    """Slots from ``cache``, copies through ``copier`` (a CopyEngine), counts in ``stats``."""

    def __init__(self, cache: ExpertCache, copier, stats: OffloadStats, num_experts: int):
        self.cache = cache
        self.copier = copier
        self.stats = stats
        self.num_experts = num_experts
        self._host = None             # a HostTier when the experts live on disk (three tiers), else None
        self.call_keys: set[int] = set()   # the running call's experts: never evicted from the host cache

    @property
    def host(self):
        return self._host

    @host.setter
    def host(self, tier) -> None:
        """Attach a HostTier: a demand that finds every host row read by queued prefetches undoes one of
        them through ``drop`` (the one undo of a prefetch), never by evicting under its copy."""
        self._host = tier
        if tier is not None:
            tier.drop_prefetch = self.drop

    def ensure_host(self, key: int) -> None:
        """With a disk tier: ``key``'s bytes in host memory before it is copied or run on the CPU."""
        if self.host is not None:
            self.host.ensure(key, self.call_keys)

    def copy_in(self, key: int, kind: str = DEMAND, locked: Collection[int] = (), evict: bool = True) -> int | None:
        """Give missing expert ``key`` a slot and start its copy (demand: now; prefetch: queued at low
        priority). Never evicts a key in ``locked``; with ``evict=False`` only a free slot is taken.
        Returns the slot, or None when no slot could be had."""
        if self.cache.lookup(key) >= 0:
            raise ValueError(f"expert {key} is already resident")
        busy = self.copier.busy_keys() if evict else ()
        got = self.cache.place(key, locked, evict=evict, busy=busy)
        if got is None:
            return None
        slot, evicted = got
        if evicted >= 0:
            layer = evicted // self.num_experts
            if self.copier.cancel(evicted):     # its queued chunks must never land over ``key``
                self.stats.prefetch_cancelled[layer] += 1
            self.stats.evictions[layer] += 1
        self.ensure_host(key)
        if kind == DEMAND:
            self.copier.copy(key, slot)
        else:
            self.copier.prefetch(key, slot)
        return slot

    def expedite(self, key: int) -> bool:
        """A resident expert whose prefetch is still queued is needed now: the rest is a demand copy."""
        return self.copier.expedite(key)

    def drop(self, key: int) -> bool:
        """A prefetch found stale: cancel its queued copy and free its slot. True if it was cancelled;
        a copy already on the stream is left to land and the expert stays resident."""
        if not self.copier.cancel(key):
            return False
        self.cache.remove(key)     # only if still resident: an evicted key's queue entry is gone already
        return True
