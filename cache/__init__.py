"""Device expert cache: slot pool, residency, eviction policies, allocation, simulator (moe_offload.cache)."""

from .allocation import ALLOCATIONS, dp_quotas, lru_miss_curves, shallow_quotas, slot_pools, uniform_quotas
from .expert_cache import ExpertCache
from .layout import ExpertLayout
from .miss_scheduler import CopyEveryMiss, MissPlan
from .policies import (
    POLICIES,
    SIMULATION_ONLY,
    ARCPolicy,
    BeladyPolicy,
    CachePolicy,
    LFUPolicy,
    LRUPolicy,
    ScorePolicy,
    make_policy,
)
from .pools import SlotPools
from .routing import RoutingArrays, call_spans, router_calls
from .simulator import CacheSimulator, SimulationResult
from .slots import ExpertSlots

__all__ = [
    "ALLOCATIONS", "ARCPolicy", "BeladyPolicy", "CachePolicy", "CacheSimulator", "CopyEveryMiss", "ExpertCache",
    "ExpertLayout", "ExpertSlots", "LFUPolicy", "LRUPolicy", "MissPlan", "POLICIES", "RoutingArrays",
    "SIMULATION_ONLY", "ScorePolicy", "SimulationResult", "SlotPools", "call_spans", "dp_quotas",
    "lru_miss_curves", "make_policy", "router_calls", "shallow_quotas", "slot_pools", "uniform_quotas",
]
