"""HostTier: the page-locked host expert cache between the disk and the device slots.

Three tiers: device slots <- host cache (``host_memory``) <- disk. Each expert's bytes come from disk
(positional reads, transfer.disk) into a row of the host store that the host cache's own policy picks
(cache.ExpertCache over bookkeeping slots: the same policies as the device cache). Rules:

- a row is never reused while a device copy may still read it (the copier's busy keys: queued or in
  flight), while a read into it is in flight, or while the current call uses its expert (``locked``);
  when a demand finds every row so held, the copies on the streams land, reads ahead give their rows
  back, and then queued device prefetches do (farthest ahead first: cancelled, device slot freed);
- a demand read waits; a prefetch read runs in the background, and a demand for it promotes it ahead of
  the other queued reads and waits for it; a stale prefetch read is cancelled before it starts;
- every copy to the device and every CPU-run expert first ``ensure``s its expert is in host memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import torch

from ..cache import ExpertCache
from ..errors import MoEOffloadError
from ..transfer import HostExpertStore
from ..transfer.disk import DEMAND, PREFETCH, DiskReader, Read, Run
from .stats import OffloadStats


class HostTier:
    """``store`` (with a capacity), ``cache`` (its slots are the store's rows), reads by ``reader`` of
    ``runs`` per key; ``copier``'s busy keys are never evicted."""

    def __init__(self, store: HostExpertStore, cache: ExpertCache, reader: DiskReader, runs: dict[int, list[Run]],
                 copier, stats: OffloadStats, source: str = "checkpoint"):
        self.store = store
        self.cache = cache
        self.reader = reader
        self.runs = runs
        self.copier = copier
        self.stats = stats
        self.source = source                    # "checkpoint" or "cache file": where the reads go
        self.pending: dict[int, Read] = {}      # key -> read in flight into its row
        self.prefetch_used = 0                  # prefetch reads a call then needed
        self.wait_s = 0.0                       # seconds calls waited for reads (demand, or prefetch still landing)
        self.hidden_s = 0.0                     # seconds of used prefetch reads that no call waited for
        # key -> True if its queued device prefetch was cancelled and its slot freed (set by the residency)
        self.drop_prefetch: Callable[[int], bool] | None = None

    def reset_counters(self) -> None:
        self.prefetch_used, self.wait_s, self.hidden_s = 0, 0.0, 0.0

    def resident(self, key: int) -> bool:
        return self.cache.lookup(key) >= 0

    def ready(self, key: int) -> bool:
        """In host memory with its read landed: a device copy can start from it now."""
        read = self.pending.get(key)
        return self.cache.lookup(key) >= 0 and (read is None or read.done.is_set())

    def read_s(self, key: int, full_s: float) -> float:
        """Seconds before ``key`` is in host memory: 0 when it is, the rest of its read when one is in
        flight, else ``full_s`` (a whole read)."""
        read = self.pending.get(key)
        if self.cache.lookup(key) >= 0:
            return 0.0 if read is None else self.reader.remaining_s(read, full_s)
        return full_s

    def ensure(self, key: int, locked: Collection[int] = ()) -> None:
        """Expert ``key``'s bytes in host memory now: a hit, the wait for its prefetch read, or a demand read."""
        layer = key // self.store.num_experts
        if self.cache.lookup(key) >= 0:
            read = self.pending.pop(key, None)
            if read is not None:
                self.reader.promote(read)
                waited = self._wait(read)
                self.prefetch_used += 1
                self.hidden_s += max(0.0, read.done_at - read.started_at - waited)
            else:
                self.stats.host_hits[layer] += 1
            self.cache.touch(key)
            return
        self._wait(self._start(key, locked, DEMAND))
        self.cache.touch(key)

    def _wait(self, read: Read) -> float:
        start = time.perf_counter()
        read.wait()
        waited = time.perf_counter() - start
        self.wait_s += waited
        return waited

    def prefetch(self, key: int, locked: Collection[int] = ()) -> bool:
        """Start reading ``key`` in the background unless it is in host memory; True if a read started."""
        if self.cache.lookup(key) >= 0:
            return False
        read = self._start(key, locked, PREFETCH, must=False)
        if read is None:
            return False
        self.pending[key] = read
        self.stats.disk_prefetches[key // self.store.num_experts] += 1
        return True

    def cancel(self, key: int) -> bool:
        """Drop a prefetch read that has not started (its row is freed). True if dropped."""
        read = self.pending.get(key)
        if read is None or not self.reader.cancel(read):
            return False
        del self.pending[key]
        self._forget(key)
        return True

    def _forget(self, key: int) -> None:
        """A cancelled read: its row is free again and it was never read."""
        self.cache.remove(key)
        self.store.slot_of[key] = -1
        layer = key // self.store.num_experts
        self.stats.disk_reads[layer] -= 1
        self.stats.disk_prefetches[layer] -= 1

    def _start(self, key: int, locked: Collection[int], priority: int, must: bool = True) -> Read | None:
        """Pick a row for ``key`` (evicting per the host policy) and submit its read."""
        self._retire()
        keep = set(locked) | set(self.pending) | self.copier.busy_keys()
        got = self.cache.place(key, keep)
        if got is None and must:             # every row is in use: land the copies and the reads ahead, retry
            self.copier.synchronize()
            self._settle_pending()
            got = self._place_after_settling(key, set(locked))
        if got is None:
            if not must:
                return None
            raise MoEOffloadError(f"no host-cache row for expert {key}: every row holds an expert this call uses; "
                                  "give host_memory at least one MoE layer's experts")
        row, evicted = got
        if evicted >= 0:
            self.store.slot_of[evicted] = -1
        self.store.slot_of[key] = row
        self.stats.disk_reads[key // self.store.num_experts] += 1
        out = self.store.blocks[row].view(torch.uint8).numpy()
        return self.reader.submit(self.runs[key], out, priority)

    def _place_after_settling(self, key: int, locked: set[int]) -> tuple[int, int] | None:
        """A row for ``key`` once the copies on the streams have landed: never one a queued device copy
        still reads. When only such rows are left, the farthest-ahead queued prefetch not in ``locked``
        gives its row back: its queued chunks are cancelled and its device slot freed (``drop_prefetch``,
        the residency's own undo of a prefetch), until a row is free."""
        while True:
            busy = self.copier.busy_keys()
            got = self.cache.place(key, locked | busy)
            givers = sorted((k for k in busy - locked if self.cache.lookup(k) >= 0), reverse=True)
            if got is not None or not givers or self.drop_prefetch is None:
                return got
            if self.drop_prefetch(givers[0]):
                self.stats.prefetch_cancelled[givers[0] // self.store.num_experts] += 1
            elif givers[0] in self.copier.busy_keys():    # could not be cancelled: never evict under it
                return None

    def _settle_pending(self) -> None:
        """Reads ahead give their rows back: a queued one is cancelled, one under way is waited for (its
        expert is then an ordinary resident, evictable)."""
        for key, read in list(self.pending.items()):
            if self.reader.cancel(read):
                self._forget(key)
            else:
                self._wait(read)
            del self.pending[key]

    def _retire(self) -> None:
        """Forget prefetch reads that have landed (their rows are then ordinary residents)."""
        for key in [k for k, read in self.pending.items() if read.done.is_set()]:
            read = self.pending.pop(key)
            if read.error is not None:
                raise read.error

    def close(self) -> None:
        self.reader.close()
        self.pending.clear()
