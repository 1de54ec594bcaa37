"""Exact decisions of every cache policy on short hand-written traces.

Each access is one single-expert router call driven through the engine's own
CallProtocol (route, then run: lookup, observe, on a miss a slot with the call's
experts locked, touch), over a SimulatedLink that moves no bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_offload.cache import (
    ARCPolicy,
    BeladyPolicy,
    ExpertCache,
    ExpertLayout,
    ExpertSlots,
    FrequencyOraclePolicy,
    LFUPolicy,
    LRUPolicy,
    ScorePolicy,
    SlotPools,
    make_policy,
)
from moe_offload.runtime.protocol import CallProtocol, Costed, RouterRecord
from moe_offload.runtime.stats import OffloadStats
from moe_offload.simulate.link import SimulatedLink

HIT = "hit"


def make_cache(policy, slots: int, keys: int = 16, pools: SlotPools | None = None) -> ExpertCache:
    return ExpertCache(ExpertSlots.bookkeeping(slots, keys), policy, pools)


def access(cache: ExpertCache, key: int, probs=None, experts: int = 16):
    """One single-expert router call, run through CallProtocol; returns HIT or the evicted key (-1: a free
    slot). ``probs``: the call's router scores over the layer's ``experts``."""
    layer, expert = divmod(key, experts)
    layout = ExpertLayout(len(cache.slots.expert_to_slot) // experts, experts, 1)   # keys = layers x experts
    stats = OffloadStats(layout.num_layers, bytes_per_expert=0)
    protocol = CallProtocol(layout, cache, SimulatedLink(), stats)
    counts = [0] * experts
    counts[expert] = 1
    protocol.route(layer, RouterRecord(counts, None if probs is None else np.asarray([probs])))   # [T=1, E]
    resident = set(cache.slots.resident())
    protocol.run(layer, 1, protocol.record(layer, torch.tensor([expert])), Costed())
    assert cache.lookup(key) >= 0 and stats.hits.sum() + stats.misses.sum() == 1
    if stats.hits.sum():
        return HIT
    evicted = resident - set(cache.slots.resident())
    assert len(evicted) == stats.evictions.sum() <= 1
    return evicted.pop() if evicted else -1


def replay(cache: ExpertCache, keys: list[int], experts: int = 16) -> list:
    return [access(cache, k, experts=experts) for k in keys]


def test_lru():
    cache = make_cache(LRUPolicy(), 2)
    # 1 miss, 2 miss, 1 hit, 3 miss evicts 2 (older), 2 miss evicts 1, 4 miss evicts 3, 4 hit, 1 miss evicts 2
    assert replay(cache, [1, 2, 1, 3, 2, 4, 4, 1]) == [-1, -1, HIT, 2, 1, 3, HIT, 2]
    assert cache.residents() == {1, 4}


def test_lfu_counts_survive_eviction_and_ties_go_to_lru():
    cache = make_cache(LFUPolicy(ExpertLayout(1, 16, 1)), 2)
    # 1 miss, 1 hit (1: 2 uses), 2 miss (2: 1 use), 3 miss: 2 has fewer uses than 1 -> evict 2;
    # 2 miss: 3 (1 use) < 1 (2 uses) -> evict 3, and 2 now has 2 uses (its count survived);
    # 4 miss: 1 and 2 both have 2 uses, 1 was used longer ago -> evict 1;
    # 1 miss (3 uses now): 4 (1 use) < 2 (2 uses) -> evict 4
    assert replay(cache, [1, 1, 2, 3, 2, 4, 1]) == [-1, HIT, -1, 2, 3, 1, 4]
    assert cache.residents() == {1, 2}
    assert cache.policy._uses[[1, 2, 3, 4]].tolist() == [3, 2, 1, 1]


def score_cache(slots: int = 2, **params) -> ExpertCache:
    return make_cache(ScorePolicy(ExpertLayout(1, 4, 1), **params), slots, keys=4)


def test_score_minus_recent_decisions():
    cache = score_cache(top_p=2)     # alpha 0.5, top_p = 2 * top_k = 2 (HybriMoE's rule, no duel)
    policy = cache.policy
    # call 1: s = [.6 .3 .1 0], top-2 = {0, 1}: S = [.3 .15 0 0]; 0 misses into a free slot
    assert access(cache, 0, [0.6, 0.3, 0.1, 0.0], experts=4) == -1
    np.testing.assert_allclose(policy.scores, [0.3, 0.15, 0, 0])
    # call 2: s = [.1 .2 .7 0], top-2 = {2, 1}: S = [.15 .175 .35 0]; 2 takes the other free slot
    assert access(cache, 2, [0.1, 0.2, 0.7, 0.0], experts=4) == -1
    np.testing.assert_allclose(policy.scores, [0.15, 0.175, 0.35, 0])
    # call 3: s = [0 .5 .1 .4], top-2 = {1, 3}: S = [.075 .3375 .175 .2]; 1 evicts 0 (.075 < .175)
    assert access(cache, 1, [0.0, 0.5, 0.1, 0.4], experts=4) == 0
    np.testing.assert_allclose(policy.scores, [0.075, 0.3375, 0.175, 0.2])
    # call 4: s = [0 .1 .2 .7], top-2 = {3, 2}: S = [.0375 .16875 .1875 .45]; 3 evicts 1 (.16875 < .1875),
    # where LRU would evict 2 (used longer ago)
    assert access(cache, 3, [0.0, 0.1, 0.2, 0.7], experts=4) == 1
    np.testing.assert_allclose(policy.scores, [0.0375, 0.16875, 0.1875, 0.45])
    assert cache.residents() == {2, 3}


def test_score_prefill_averages_tokens_and_defaults():
    policy = ScorePolicy(ExpertLayout(2, 8, 2))
    assert (policy.alpha, policy.top_p, policy.candidates) == (0.5, 4, (4, 2))   # duel 2k vs k by default
    assert ScorePolicy(ExpertLayout(2, 8, 2), top_p=3).candidates == (3,)
    policy = ScorePolicy(ExpertLayout(1, 4, 1), alpha=0.5, top_p=2)
    # two tokens: mean s = [.4 .2 .4 0]; top-2 (ties by expert id) = {0, 2}
    policy.observe(0, [0, 2], np.array([[0.8, 0.2, 0.0, 0.0], [0.0, 0.2, 0.8, 0.0]]))
    np.testing.assert_allclose(policy.scores, [0.2, 0.0, 0.2, 0.0])
    # no scores given: s = 1/len(chosen) on the chosen experts, here s = [0 0 0 1]; top-2 = {3, 0}
    policy.observe(0, [3], None)
    np.testing.assert_allclose(policy.scores, [0.1, 0.0, 0.1, 0.5])


def test_score_normalises_sigmoid_scores_and_credits_only_the_chosen_when_selection_ignores_scores():
    policy = ScorePolicy(ExpertLayout(2, 4, 1), top_p=2)
    # layer 0, sigmoid-like scores follow the selection: s = [.9 .6 .3 .2] / 2 = [.45 .3 .15 .1]; top-2 = {0, 1}
    policy.observe(0, [0], np.array([[0.9, 0.6, 0.3, 0.2]]))
    np.testing.assert_allclose(policy.scores[:4], [0.225, 0.15, 0, 0])
    # layer 1 picks expert 0 although it scores lowest (a biased router): only the chosen are credited,
    # s = [1 0 0 0]: S = [.5 0 0 0]; the layer stays that way even when a later call looks ordinary
    policy.observe(1, [0], np.array([[0.1, 0.2, 0.3, 0.4]]))
    np.testing.assert_allclose(policy.scores[4:], [0.5, 0, 0, 0])
    policy.observe(1, [1], np.array([[0.1, 0.6, 0.2, 0.1]]))
    np.testing.assert_allclose(policy.scores[4:], [0.25, 0.5, 0, 0])
    assert policy.selection_follows_scores.tolist() == [True, False]


def test_score_hint_protects_predicted_experts_until_the_layer_runs():
    policy = ScorePolicy(ExpertLayout(2, 4, 1), top_p=1)
    policy.observe(1, [0], np.array([[0.9, 0.1, 0.0, 0.0]]))   # S[4] = .45, S[5..7] = 0
    policy.observe(0, [2], np.array([[0.0, 0.0, 0.6, 0.4]]))   # S[2] = .3
    assert policy.victim([2, 5]) == 5
    policy.hint(1, np.array([0.0, 0.8, 0.0, 0.0]))              # layer 1's next call predicted to use expert 1
    assert policy.victim([2, 5]) == 2                           # max(S[5], .8) > S[2]
    policy.observe(1, [0], np.array([[1.0, 0.0, 0.0, 0.0]]))   # the layer ran: hint cleared
    assert policy.victim([2, 5]) == 5


def test_score_duel_rewards_near_misses_when_they_come_next():
    # one layer, 4 experts, top-1, 2 resident experts: each S "keeps" its top-2 experts
    policy = ScorePolicy(ExpertLayout(1, 4, 1))                 # p = 2 (HybriMoE) duels p = 1
    policy.admit(0)
    policy.admit(1)
    assert policy.chosen_p == [2]                               # no evidence yet: HybriMoE's p
    # call 1 picks 0, s = [.6 .4 0 0]: both S are 0, keep {0, 1} (ties by id): both hold 0
    policy.observe(0, [0], np.array([[0.6, 0.4, 0.0, 0.0]]))
    np.testing.assert_allclose(policy.merit, [[1.0, 1.0]])
    np.testing.assert_allclose(policy.shadow, [[0.3, 0.2, 0, 0], [0.3, 0, 0, 0]])
    # call 2 picks 1, s = [.1 .5 .4 0]: p=2 keeps {0, 1}, p=1 keeps {0, 1} (ties by id): both hold 1
    policy.observe(0, [1], np.array([[0.1, 0.5, 0.4, 0.0]]))
    np.testing.assert_allclose(policy.merit, [[1.99, 1.99]])
    np.testing.assert_allclose(policy.shadow, [[0.15, 0.35, 0.2, 0], [0.15, 0.25, 0, 0]])
    # call 3 picks 2, last call's near miss: p=2 keeps {1, 2} and holds it, p=1 keeps {1, 0} and does not
    policy.observe(0, [2], np.array([[0.0, 0.3, 0.7, 0.0]]))
    np.testing.assert_allclose(policy.merit, [[0.99 * 1.99 + 1, 0.99 * 1.99]])
    assert policy.chosen_p == [2]
    np.testing.assert_allclose(policy.scores[:4], [0.075, 0.325, 0.45, 0])


def test_score_duel_switches_to_top_k_when_near_misses_mislead():
    # one layer, 4 experts, top-1, 2 resident: the picks alternate 0, 1, 0, 1, ... and the runner-up is
    # always expert 2, never picked. p = 1 keeps {0, 1} and holds every pick; p = 2 keeps expert 2
    # (credited every call) and the last pick, so it misses the next one.
    policy = ScorePolicy(ExpertLayout(1, 4, 1))
    policy.admit(0)
    policy.admit(1)
    for call in range(20):
        probs = np.array([0.0, 0.0, 0.45, 0.05])
        probs[call % 2] = 0.5
        policy.observe(0, [call % 2], probs[None])
    assert policy.merit[0, 1] > policy.merit[0, 0] + 5
    assert policy.chosen_p == [1]
    np.testing.assert_allclose(policy.scores, policy.shadow[1])
    # a fixed top_p turns the duel off
    fixed = ScorePolicy(ExpertLayout(1, 4, 1), top_p=2)
    assert fixed.candidates == (2,)


def test_score_ranks_other_layers_by_score_per_step_until_their_layer_runs():
    policy = ScorePolicy(ExpertLayout(3, 2, 1), top_p=1)       # 3 layers x 2 experts, keys 0..5
    policy.observe(0, [0], np.array([[0.8, 0.2]]))              # S[0] = .4
    policy.observe(1, [0], np.array([[1.0, 0.0]]))              # S[2] = .5
    policy.observe(2, [0], np.array([[0.6, 0.4]]))              # S[4] = .3; layer 2 ran last
    # layer 0 runs next (1 step): .4 / 1; layer 1 in 2 steps: .5 / 2 = .25 -> evict 2, not the lower-S 0
    assert policy.victim([0, 2]) == 2
    # layer 2 runs again in 3 steps: .3 / 3 = .1
    assert policy.victim([0, 2, 4]) == 4
    policy.observe(0, [1], np.array([[0.0, 1.0]]))              # now layer 1 is next: S[0] = .2 / 3, S[2] = .5 / 1
    assert policy.victim([0, 2]) == 0


def test_arc_decisions():
    cache = make_cache(ARCPolicy(), 2)
    st = cache.policy.state(0)
    # 1, 2: misses into t1 = [1, 2]; 1 hit: t1 = [2], t2 = [1]
    # 3: new; |t1| = 1 > p = 0: evict t1's oldest, 2 -> b1 = [2]; t1 = [3]
    # 2: ghost hit in b1: p = 0 + max(0/1, 1) = 1; |t1| = 1 is not > p: evict t2's oldest, 1 -> b2 = [1];
    #    2 enters t2 = [2]
    # 3 hit: t1 = [], t2 = [2, 3]
    # 4: new; t1 empty: evict t2's oldest, 2 -> b2 = [1, 2]; t1 = [4]
    # 1: ghost hit in b2: p = max(0, 1 - max(0/2, 1)) = 0; |t1| = 1 > 0: evict 4 -> b1 = [4]; t2 = [3, 1]
    #    (LRU would evict 3 here)
    # 5: new; directory full (|t1|+|t2|+|b1|+|b2| = 4 = 2c): drop b2's oldest, 2; evict t2's oldest, 3 -> b2 = [3]
    assert replay(cache, [1, 2, 1, 3, 2, 3, 4, 1, 5]) == [-1, -1, HIT, 2, 1, HIT, 2, 4, 3]
    assert cache.residents() == {1, 5}
    assert (list(st.t1), list(st.t2), list(st.b1), list(st.b2), st.p) == ([5], [1], [4], [3], 0.0)


def test_arc_runs_one_instance_per_layer_pool():
    pools = SlotPools.per_layer([1, 2], experts_per_layer=8)
    cache = make_cache(ARCPolicy(), 3, pools=pools)
    assert [s.capacity for s in cache.policy._states] == [1, 2]
    # layer 0 (keys 0..7) holds one expert: 3 evicts 1; layer 1 fills its two slots, untouched by layer 0
    assert replay(cache, [1, 9, 10, 3, 9], experts=8) == [-1, -1, -1, 1, HIT]
    assert cache.residents(0) == {3} and cache.residents(1) == {9, 10}


def test_belady_evicts_the_furthest_next_use():
    future = [[1], [2], [3], [1], [2], [4], [1], [3]]   # one call per step
    cache = make_cache(BeladyPolicy(ExpertLayout(1, 16, 1), future), 2)
    # step 2: 3 misses; next uses 1 -> 3, 2 -> 4: evict 2. step 4: 2 misses; 1 -> 6, 3 -> 7: evict 3.
    # step 5: 4 misses; 1 -> 6, 2 -> never: evict 2. step 7: 3 misses; 1 and 4 never used again: smaller key, 1
    assert replay(cache, [k for (k,) in future]) == [-1, -1, 2, HIT, 3, 2, HIT, 1]
    assert cache.policy.clock == len(future) - 1


def test_locked_and_pool_quotas():
    pools = SlotPools.per_layer([2, 1], experts_per_layer=4)
    cache = make_cache(LRUPolicy(), 3, keys=8, pools=pools)
    cache.place(0), cache.place(1), cache.place(4)
    assert cache.place(5) == (cache.slots.lookup(5), 4)   # layer 1 at quota evicts its own resident
    assert cache.place(2, locked={0, 1}) is None          # layer 0 full and locked
    assert cache.place(2, locked={0})[1] == 1
    assert cache.residents(0) == {0, 2} and cache.residents(1) == {5}


def test_release_behind_the_cache_resyncs():
    cache = make_cache(LRUPolicy(), 2)
    cache.place(1), cache.place(2)
    cache.slots.free(1)          # e.g. a cancelled prefetch freed through the slots
    cache.policy.remove(1)
    assert cache.residents() == {2}
    assert cache.place(3) == (cache.slots.lookup(3), -1)
    assert cache.remove(2) >= 0 and cache.residents() == {3}


def test_make_policy():
    layout = ExpertLayout(2, 4, 2)
    assert make_policy("score", layout, alpha=0.3).alpha == 0.3
    assert isinstance(make_policy("lru"), LRUPolicy)
    with pytest.raises(ValueError, match="simulator"):
        make_policy("belady", layout)
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_policy("fifo", layout)


def test_frequency_oracle_keeps_the_most_selected_experts():
    future = [[1], [2], [1], [3], [1], [3], [2], [3]]   # key 1 three times, 2 twice, 3 three times
    cache = make_cache(FrequencyOraclePolicy(ExpertLayout(1, 16, 1), future), 2)
    # step 3: 3 misses with 1 and 2 resident; 2 is selected least: evicted. Step 6: 2 misses with 1 and 3
    # resident, three uses each: the tie goes to the smaller key, 1.
    assert replay(cache, [k for (k,) in future]) == [-1, -1, HIT, 2, HIT, HIT, 1, HIT]
    with pytest.raises(ValueError, match="simulator"):
        make_policy("frequency", ExpertLayout(1, 16, 1))


def test_frequency_oracle_with_repeat_values_the_last_selection():
    policy = FrequencyOraclePolicy(ExpertLayout(1, 4, 1), repeat=0.5, rates=np.array([0.4, 0.3, 0.2, 0.1]))
    policy.observe(0, [3])                      # values 0.2, 0.15, 0.1, 0.05 + 0.5
    assert policy.victim([0, 3]) == 0 and policy.victim([2, 3]) == 2
    policy.observe(0, [1])                      # 3 is no longer the last selection: 0.05; 1: 0.65
    assert policy.victim([0, 3]) == 3 and policy.victim([0, 1]) == 0
