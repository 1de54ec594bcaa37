"""Per-layer slot allocation: uniform, Fate's shallow-favoring split, AdapMoE's DP, LRU miss curves."""

from __future__ import annotations

import numpy as np
import pytest

from moe_offload.cache import (
    ExpertLayout,
    SlotPools,
    dp_quotas,
    shallow_quotas,
    slot_pools,
    uniform_quotas,
)
from moe_offload.simulate import RoutingArrays, lru_miss_curves


def test_uniform_gives_the_remainder_to_the_first_layers():
    layout = ExpertLayout(4, 8, 2)
    assert uniform_quotas(10, layout) == (3, 3, 2, 2)
    assert uniform_quotas(32, layout) == (8, 8, 8, 8)
    assert uniform_quotas(100, layout) == (8, 8, 8, 8)   # capped at every expert cached
    with pytest.raises(ValueError, match="at least one slot per MoE layer"):
        uniform_quotas(3, layout)


def test_shallow_caches_the_first_four_layers_when_the_budget_allows():
    layout = ExpertLayout(8, 4, 2)
    assert shallow_quotas(20, layout) == (4, 4, 4, 4, 1, 1, 1, 1)   # 16 for layers 0-3, 4 left for 4 layers
    assert shallow_quotas(27, layout) == (4, 4, 4, 4, 3, 3, 3, 2)   # 11 left over 4 layers
    assert shallow_quotas(19, layout) == (3, 3, 3, 2, 2, 2, 2, 2)   # 16 + 4 does not fit: uniform
    assert shallow_quotas(12, ExpertLayout(3, 4, 2)) == (4, 4, 4)


def test_dp_minimises_the_expected_misses():
    curves = np.array([
        [10, 8, 1, 0.5],   # layer 0: a second slot saves 7 misses, a third 0.5
        [10, 5, 4, 3],     # layer 1: each extra slot saves 1
        [10, 2, 2, 2],     # layer 2: one slot is all it needs
    ])
    # 4 slots: (2,1,1) = 1+5+2 = 8. 5 slots: (2,2,1) = 7 beats (3,1,1) = 7.5. 9 slots: everything.
    assert dp_quotas(4, curves) == (2, 1, 1)
    assert dp_quotas(5, curves) == (2, 2, 1)
    assert dp_quotas(6, curves) == (2, 3, 1)
    assert dp_quotas(20, curves) == (3, 3, 3)
    with pytest.raises(ValueError):
        dp_quotas(2, curves)


def test_lru_miss_curves_from_stack_distances():
    ids = np.array([0, 1, 0, 2, 1, 0])[:, None, None]                # [N, L=1, k=1]
    routing = RoutingArrays(ids, None, np.zeros(6, np.int32), np.ones(6, bool), num_experts=4)
    # distances: 0 new, 1 new, 0 -> 1, 2 new, 1 -> 2 (0, 2 since), 0 -> 2 (2, 1 since)
    # misses with q slots = accesses with distance >= q
    np.testing.assert_array_equal(lru_miss_curves(routing), [[6, 6, 5, 3, 3]])


def test_slot_pools_by_name():
    layout = ExpertLayout(2, 4, 1)
    assert slot_pools("global", 3, layout) == SlotPools.shared(3)
    pools = slot_pools("uniform", 5, layout)
    assert pools.capacity == (3, 2) and pools.pool_of(5) == 1
    assert slot_pools("dp", 5, layout, np.array([[9, 5, 4, 3, 2], [9, 1, 1, 1, 1]])).capacity == (4, 1)
    with pytest.raises(ValueError, match="miss curves"):
        slot_pools("dp", 5, layout)
    with pytest.raises(ValueError, match="unknown slot allocation"):
        slot_pools("random", 5, layout)
