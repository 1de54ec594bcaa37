"""Device expert cache: slot pool, residency, eviction policies (moe_offload.cache)."""

from .expert_cache import ExpertCache
from .policies import POLICIES, CachePolicy, LRUPolicy, make_policy
from .slots import ExpertSlots

__all__ = ["POLICIES", "CachePolicy", "ExpertCache", "ExpertSlots", "LRUPolicy", "make_policy"]
