"""ARCPolicy: Adaptive Replacement Cache (Megiddo & Modha, FAST'03), one instance per slot pool."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .base import CachePolicy
from .layout import ExpertLayout
from .pools import SlotPools


@dataclass
class ArcState:
    """ARC lists of one pool of ``capacity`` slots; every list is ordered oldest first."""

    capacity: int
    t1: OrderedDict = field(default_factory=OrderedDict)   # resident, used once since entering
    t2: OrderedDict = field(default_factory=OrderedDict)   # resident, used at least twice
    b1: OrderedDict = field(default_factory=OrderedDict)   # ghosts evicted from t1
    b2: OrderedDict = field(default_factory=OrderedDict)   # ghosts evicted from t2
    p: float = 0.0                                         # target size of t1
    incoming_to_t2: bool = False                           # the pending miss was a ghost hit
    incoming_from_b2: bool = False


class ARCPolicy(CachePolicy):
    """ARC as Fate uses it within a layer, adapted to the cache's call order.

    A miss (``on_miss``) runs ARC's ghost-hit cases: a key found in b1 grows
    the target p, one in b2 shrinks it, and either enters t2; a new key enters
    t1 and trims the ghost lists as ARC's case IV does. ``victim`` is ARC's
    REPLACE restricted to the evictable candidates: evict the oldest candidate
    of t1 when ``|t1| > p`` (or ``|t1| == p`` and the miss came from b2), else
    the oldest candidate of t2, falling back to the other list when the
    preferred one holds no candidate. A hit (``touch``) moves a key to the
    newest end of t2. The ``touch`` that follows a key's own admission in the
    same router call is part of that access and does not promote it.
    With per-layer pools each layer runs its own ARC.
    """

    name = "arc"

    def __init__(self, layout: ExpertLayout | None = None) -> None:
        self._pools: SlotPools | None = None
        self._states: list[ArcState] = []
        self._fresh: set[int] = set()   # admitted in the current access, not yet touched

    def bind_pools(self, pools: SlotPools) -> None:
        self._pools = pools
        self._states = [ArcState(c) for c in pools.capacity]

    def state(self, key: int) -> ArcState:
        if self._pools is None:
            raise RuntimeError("ARCPolicy needs bind_pools() before use (ExpertCache does it)")
        return self._states[self._pools.pool_of(key)]

    def on_miss(self, key: int) -> None:
        st = self.state(key)
        st.incoming_from_b2 = key in st.b2
        st.incoming_to_t2 = key in st.b1 or key in st.b2
        if key in st.b1:
            st.p = min(st.capacity, st.p + max(len(st.b2) / len(st.b1), 1.0))
            del st.b1[key]
        elif key in st.b2:
            st.p = max(0.0, st.p - max(len(st.b1) / len(st.b2), 1.0))
            del st.b2[key]
        elif len(st.t1) + len(st.b1) >= st.capacity and st.b1:
            st.b1.popitem(last=False)
        elif len(st.t1) + len(st.t2) + len(st.b1) + len(st.b2) >= 2 * st.capacity and st.b2:
            st.b2.popitem(last=False)

    def victim(self, candidates: Sequence[int]) -> int:
        allowed = set(candidates)
        st = self.state(next(iter(allowed)))
        t1_first = bool(st.t1) and (len(st.t1) > st.p or (st.incoming_from_b2 and len(st.t1) == st.p))
        for lst in (st.t1, st.t2) if t1_first else (st.t2, st.t1):
            for key in lst:
                if key in allowed:
                    return key
        raise ValueError("no evictable candidate")

    def remove(self, key: int) -> None:
        st = self.state(key)
        self._fresh.discard(key)
        if key in st.t1:
            del st.t1[key]
            st.b1[key] = None
        elif key in st.t2:
            del st.t2[key]
            st.b2[key] = None

    def admit(self, key: int) -> None:
        st = self.state(key)
        (st.t2 if st.incoming_to_t2 else st.t1)[key] = None
        st.incoming_to_t2 = st.incoming_from_b2 = False
        self._fresh.add(key)
        while len(st.t1) + len(st.b1) > st.capacity and st.b1:
            st.b1.popitem(last=False)
        while len(st.t1) + len(st.t2) + len(st.b1) + len(st.b2) > 2 * st.capacity and st.b2:
            st.b2.popitem(last=False)

    def touch(self, key: int) -> None:
        st = self.state(key)
        if key in self._fresh:
            self._fresh.discard(key)
        elif key in st.t1:
            del st.t1[key]
            st.t2[key] = None
            return
        lst = st.t2 if key in st.t2 else st.t1
        lst.move_to_end(key)
