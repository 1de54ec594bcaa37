"""Device expert cache: slots, residency, eviction policies, slot pools and their allocation (moe_offload.cache)."""

from .allocation import (
    ALLOCATIONS,
    RUNTIME_ALLOCATIONS,
    Allocation,
    dp_quotas,
    shallow_quotas,
    slot_pools,
    uniform_quotas,
)
from .expert_cache import ExpertCache
from .layout import ExpertLayout
from .pools import SlotPools
from .registry import (
    POLICIES,
    SIMULATION_ONLY,
    ARCPolicy,
    BeladyPolicy,
    CachePolicy,
    FrequencyOraclePolicy,
    LFUPolicy,
    LRUPolicy,
    ScorePolicy,
    make_policy,
)
from .slots import ExpertSlots

__all__ = [
    "ALLOCATIONS", "ARCPolicy", "Allocation", "BeladyPolicy", "CachePolicy", "ExpertCache", "ExpertLayout",
    "ExpertSlots", "FrequencyOraclePolicy", "LFUPolicy", "LRUPolicy", "POLICIES", "RUNTIME_ALLOCATIONS",
    "SIMULATION_ONLY", "ScorePolicy", "SlotPools", "dp_quotas", "make_policy", "shallow_quotas", "slot_pools",
    "uniform_quotas",
]
