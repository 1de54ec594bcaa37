"""Exact decisions of the slot pool, LRU policy and the engine's locking."""

import torch

from moe_offload.cache import ExpertCache, ExpertSlots, LRUPolicy


def make_cache(slots: int, keys: int = 16) -> ExpertCache:
    return ExpertCache(ExpertSlots(slots, keys, 4, torch.float32, torch.device("cpu")), LRUPolicy())


def test_lru_decisions_on_a_hand_trace():
    cache = make_cache(2)
    trace = [1, 2, 1, 3, 2, 4, 4, 1]
    # 1 miss, 2 miss, 1 hit, 3 miss evicts 2, 2 miss evicts 1, 4 miss evicts 3, 4 hit, 1 miss evicts 2
    expected = [(False, -1), (False, -1), (True, None), (False, 2), (False, 1), (False, 3), (True, None), (False, 2)]
    for key, (hit, evicted) in zip(trace, expected):
        if cache.lookup(key) >= 0:
            assert hit, key
            cache.touch(key)
            continue
        assert not hit, key
        slot, out = cache.place(key)
        assert out == evicted, (key, out)
        cache.touch(key)
    assert sorted(cache.slots.resident()) == [1, 4]


def test_locked_experts_are_never_evicted():
    cache = make_cache(2)
    cache.place(5)
    cache.place(6)
    slot, evicted = cache.place(7, locked={5})
    assert evicted == 6 and cache.lookup(7) == slot and cache.lookup(6) == -1
    assert cache.place(8, locked={5, 7}) is None
    assert cache.lookup(8) == -1


def test_slot_maps_stay_consistent():
    cache = make_cache(3)
    for key in [0, 1, 2, 3, 4, 0, 5]:
        if cache.lookup(key) < 0:
            cache.place(key)
        cache.touch(key)
    slots = cache.slots
    for slot, key in enumerate(slots.slot_to_expert):
        assert slots.expert_to_slot[key] == slot
    assert (slots.expert_to_slot >= 0).sum() == 3
    assert slots.slot_of == slots.expert_to_slot.tolist()     # the list lookups read mirrors the array
    cache.remove(int(slots.slot_to_expert[0]))
    assert slots.slot_of == slots.expert_to_slot.tolist() and (slots.expert_to_slot >= 0).sum() == 2
