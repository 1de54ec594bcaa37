"""Registry of eviction policies by name. Keys are flat expert ids (layer * E + expert)."""

from __future__ import annotations

from .arc import ARCPolicy
from .base import CachePolicy
from .belady import BeladyPolicy
from .frequency import FrequencyOraclePolicy
from .layout import ExpertLayout
from .lfu import LFUPolicy
from .lru import LRUPolicy
from .score import ScorePolicy

# The names of every policy: adding one is its file and one line here. A class declares
# what it needs (CachePolicy.needs_layout, needs_future).
# Policies the runtime can use: they decide from the past only.
POLICIES: dict[str, type[CachePolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "score": ScorePolicy,
    "arc": ARCPolicy,
}
# Policies that need the future (needs_future): the simulator builds them from the trace.
SIMULATION_ONLY: dict[str, type[CachePolicy]] = {"belady": BeladyPolicy, "frequency": FrequencyOraclePolicy}


def make_policy(name: str, layout: ExpertLayout | None = None, **params) -> CachePolicy:
    """A fresh runtime policy ``name`` for a model of ``layout`` (those without needs_layout do without)."""
    if name in SIMULATION_ONLY:
        raise ValueError(f"cache policy {name!r} needs the future routing and exists only in the simulator")
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    if layout is None and cls.needs_layout:
        raise ValueError(f"cache policy {name!r} needs the model's ExpertLayout")
    return cls(layout, **params)


__all__ = ["ARCPolicy", "BeladyPolicy", "CachePolicy", "FrequencyOraclePolicy", "LFUPolicy", "LRUPolicy", "POLICIES",
           "SIMULATION_ONLY", "ScorePolicy", "make_policy"]
