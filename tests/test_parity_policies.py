"""The law under every cache policy and slot allocation: offloaded logits equal transformers'."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from transformers import AutoModelForCausalLM

import moe_offload
from moe_offload import MoEOffloadError
from moe_offload.cache import POLICIES

from copy_timing import COPY_TIMINGS
from copy_timing import load as load_timed
from tiny_checkpoints import num_experts

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))  # [B, S]
MOE_LAYERS = {"mixtral": 3, "deepseek_v3": 2}   # deepseek_v3's first layer is dense


def global_budgets() -> list:
    """(family, expert_slots): 1 slot, half and all of the model's experts, one shared pool."""
    params = []
    for family, layers in MOE_LAYERS.items():
        total = layers * num_experts(family)
        for name, slots in (("1slot", 1), ("half", total // 2), ("all", total)):
            params.append(pytest.param(family, slots, id=f"{family}-{name}"))
    return params


def quota_budgets() -> list:
    """(family, expert_slots) for per-layer pools: one slot per MoE layer, and half the experts plus one."""
    params = []
    for family, layers in MOE_LAYERS.items():
        for name, slots in (("1perlayer", layers), ("half+1", layers * num_experts(family) // 2 + 1)):
            params.append(pytest.param(family, slots, id=f"{family}-{name}"))
    return params


def load(path, **fields):
    return moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False, **fields)


@pytest.fixture(scope="module")
def references(checkpoints):
    cache = {}

    def logits(family: str) -> torch.Tensor:
        if family not in cache:
            ref = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32).eval()
            with torch.no_grad():
                cache[family] = ref(TOKENS).logits
        return cache[family]
    return logits


@pytest.mark.parametrize("timing", COPY_TIMINGS)
@pytest.mark.parametrize(("family", "slots"), global_budgets())
@pytest.mark.parametrize("policy", list(POLICIES))
def test_logits_match_with_every_policy(checkpoints, references, family, slots, policy, timing):
    model = load_timed(checkpoints[family], timing, expert_slots=slots, cache_policy=policy)
    assert model.offload.plan.num_experts == MOE_LAYERS[family] * num_experts(family)
    with torch.no_grad():
        got = model(TOKENS).logits
    assert_close(got, references(family), (family, policy, slots, timing))
    assert model.offload.config.cache_policy == policy


@pytest.mark.parametrize("timing", COPY_TIMINGS)
@pytest.mark.parametrize(("family", "slots"), quota_budgets())
@pytest.mark.parametrize("allocation", ["uniform", "shallow"])
def test_logits_match_with_per_layer_quotas(checkpoints, references, family, slots, allocation, timing):
    model = load_timed(checkpoints[family], timing, expert_slots=slots, slot_allocation=allocation)
    with torch.no_grad():
        assert_close(model(TOKENS).logits, references(family), (family, allocation, slots, timing))
    assert model.offload.engine.cache.pools.num_pools == MOE_LAYERS[family]


def test_runtime_rejects_simulation_only_choices(checkpoints):
    with pytest.raises(MoEOffloadError, match="simulation-only"):
        load(checkpoints["mixtral"], cache_policy="belady")
    with pytest.raises(MoEOffloadError, match="slot_allocation 'dp'"):
        load(checkpoints["mixtral"], slot_allocation="dp")
    with pytest.raises(MoEOffloadError, match="one slot per MoE layer"):
        load(checkpoints["mixtral"], expert_slots=2, slot_allocation="uniform")
    assert moe_offload.OffloadConfig(device="cpu").cache_policy == "score"


def test_score_parameters_reach_the_runtime_policy(checkpoints, references):
    path = checkpoints["mixtral"]
    default = load(path, expert_slots=2).offload.engine.cache.policy
    assert (default.alpha, default.candidates) == (0.5, (4, 2))        # top-2 model: duel 2k vs k
    model = load(path, expert_slots=2, score_alpha=0.3, score_top_p=3)
    policy = model.offload.engine.cache.policy
    assert (policy.alpha, policy.top_p, policy.candidates) == (0.3, 3, (3,))
    with torch.no_grad():
        assert_close(model(TOKENS).logits, references("mixtral"), "mixtral with score_alpha=0.3, score_top_p=3")
    assert policy.scores.any()                                          # the router scores were fed in
    with pytest.raises(MoEOffloadError, match="score_alpha"):
        load(path, score_alpha=0)
    with pytest.raises(MoEOffloadError, match="score_top_p"):
        load(path, score_top_p=0)
    with pytest.raises(MoEOffloadError, match="score_top_p must be an integer"):
        load(path, score_top_p="auto")
    with pytest.raises(MoEOffloadError, match="score_alpha must be a number"):
        load(path, score_alpha="half")
