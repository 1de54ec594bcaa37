"""Copies that land late and out of order: the copy engine's rules, and exact outputs under them."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, layer_budgets
from transformers import AutoModelForCausalLM

from moe_offload.cache import (
    POLICIES,
    ExpertCache,
    ExpertLayout,
    ExpertSlots,
    make_policy,
)
from moe_offload.models import shipped_model_dir
from moe_offload.transfer import CopyEngine, ExpertShape, HostExpertStore
from moe_offload.transfer.copy_engine import CopyOrderError
from moe_offload.transfer.streams import SimBackend

from copy_timing import load

SEEDS = [1, 2, 3, 4]


def make_store(num_experts: int = 4) -> HostExpertStore:
    store = HostExpertStore(1, num_experts, ExpertShape(hidden=8, intermediate=16), torch.float32, pin=False)
    for key in range(num_experts):
        store.blocks[key] = torch.arange(store.shape.numel, dtype=torch.float32) + 1000 * key
    return store


def engine(store, slots=2, seed=1, chunk_elems=None, **kw) -> CopyEngine:
    buffers = torch.zeros(slots, store.shape.numel)
    chunk = (chunk_elems or store.shape.numel) * 4
    return CopyEngine(store, buffers, backend="deferred", seed=seed, chunk_bytes=chunk, **kw)


# -- the deferred backend ---------------------------------------------------------------------------
def test_deferred_backend_lands_in_varying_orders_within_stream_order():
    orders = set()
    for seed in range(12):
        backend, log = SimBackend(deferred=True, seed=seed), []
        a, b = backend.stream(True), backend.stream(False)
        for name, stream in (("a1", a), ("b1", b), ("a2", a), ("b2", b)):
            stream._enqueue(lambda name=name: log.append(name))
        backend.drain()
        assert log.index("a1") < log.index("a2") and log.index("b1") < log.index("b2")   # stream order holds
        orders.add(tuple(log))
    assert len(orders) > 1, "streams must land in more than one order across seeds"


def test_deferred_copy_lands_only_when_waited_for_or_at_random():
    store = make_store()
    copier = engine(store, seed=0)
    copier.backend.land_probability = 0.0          # no random landing: only a wait lands it
    copier.copy(2, 0)
    assert torch.all(copier.buffers[0] == 0) and copier.backend.pending > 0
    copier.begin_read(0, 2)
    assert torch.equal(copier.buffers[0], store.block(2))


def test_wait_detects_a_slot_read_as_the_wrong_expert():
    store = make_store()
    copier = engine(store)
    copier.copy(1, 0)
    with pytest.raises(CopyOrderError, match="read as expert 3"):
        copier.begin_read(0, 3)


# -- ordering rules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_write_after_write_a_late_prefetch_never_lands_over_a_newer_copy(seed):
    """Expert 1 prefetched into slot 0 in 4 chunks; two chunks start, then slot 0 goes to expert 2."""
    store = make_store()
    numel = store.shape.numel
    copier = engine(store, seed=seed, chunk_elems=numel // 4, max_prefetch_inflight=2)
    copier.backend.land_probability = 0.0
    copier.prefetch(1, 0)
    assert copier.is_queued(1)                     # 2 of 4 chunks started, none landed
    assert copier.cancel(1)                        # evicted: the rest never starts
    copier.backend.land_probability = 0.5         # from here, landings in random order
    copier.copy(2, 0)                              # waits for the started chunks (write-after-write)
    copier.backend.drain()
    copier.begin_read(0, 2)
    assert torch.equal(copier.buffers[0], store.block(2))


@pytest.mark.parametrize("seed", SEEDS)
def test_write_after_read_and_chunked_prefetch_expedited(seed):
    store = make_store()
    numel = store.shape.numel
    copier = engine(store, slots=1, seed=seed, chunk_elems=numel // 3, max_prefetch_inflight=1)
    copier.copy(0, 0)
    copier.begin_read(0, 0)
    seen = copier.buffers[0].sum().item()
    copier.end_read(0)
    copier.backend.land_probability = 0.0
    copier.prefetch(3, 0)                          # chunk 1 of 3 started, the rest queued
    copier.backend.land_probability = 0.5
    assert copier.expedite(3) and not copier.is_queued(3)
    copier.begin_read(0, 3)
    assert torch.equal(copier.buffers[0], store.block(3))
    assert seen == store.block(0).sum().item()


def test_demand_waits_behind_at_most_the_inflight_chunks():
    store = make_store()
    numel, esize = store.shape.numel, 4
    copier = engine(store, slots=3, chunk_elems=numel // 4, max_prefetch_inflight=2)
    copier.backend.land_probability = 0.0
    copier.prefetch(0, 0)
    copier.prefetch(1, 1)
    assert copier.backlog_bytes() == 2 * (numel // 4) * esize   # two chunks on the stream, the rest queued
    assert copier.queued_bytes() == (2 * numel - 2 * (numel // 4)) * esize
    copier.copy(2, 2)
    assert copier.backlog_bytes() == (2 * (numel // 4) + numel) * esize
    assert copier.busy_keys() == {0, 1, 2}
    copier.synchronize()
    assert copier.backlog_bytes() == 0 and copier.busy_keys() == {0, 1}   # queued prefetches stay queued


# -- the cache side of the rules ----------------------------------------------------------------------
def test_slot_pool_never_takes_back_a_slot_it_did_not_hand_out():
    slots = ExpertSlots.bookkeeping(2, 8)
    with pytest.raises(KeyError):
        slots.free(5)                            # not resident: no slot -1 on the free list
    cache = ExpertCache(slots, make_policy("lru", ExpertLayout(1, 8, 2)))
    cache.place(1)
    assert cache.remove(4) == -1 and slots.has_free()


def test_experts_with_copies_in_flight_are_evicted_last():
    cache = ExpertCache(ExpertSlots.bookkeeping(2, 8), make_policy("lru", ExpertLayout(1, 8, 2)))
    cache.place(1), cache.place(2)              # LRU victim would be 1
    _, evicted = cache.place(3, busy={1})
    assert evicted == 2
    _, evicted = cache.place(4, busy={1, 3})      # everything busy: the policy decides
    assert evicted in (1, 3)


# -- exact outputs when copies land late --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_deepseek():
    path = shipped_model_dir("tiny-deepseek")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.tensor([[5, 17, 42, 99, 7, 230, 11, 64]])
    ids = ref.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = ref(ids).logits
    return path, prompt, ids, logits


@pytest.mark.parametrize("timing", ["held-1", "held-2", "deferred-3"])
@pytest.mark.parametrize("policy", ["score", "lru"])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("slots", [8, 12, 20])
def test_held_prefetches_keep_greedy_tokens(tiny_deepseek, slots, depth, policy, timing):
    """Issue repro: score + cross-layer prefetch with prefetches held in the queue crashed in take_free or
    left a slot holding another expert's weights."""
    path, prompt, ids, logits = tiny_deepseek
    model = load(path, timing, expert_slots=slots, cache_policy=policy, predictor="cross_layer",
                 prefetch_depth=depth)
    got = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ids)
    with torch.no_grad():
        assert_close(model(ids).logits, logits, ("tiny-deepseek", slots, depth, policy, timing))
    assert model.offload.stats.prefetch_issued.sum() > 0


@pytest.mark.parametrize("timing", ["held-1", "deferred-2", "deferred-5"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("slots", [4, 20])
def test_hybrid_scheduler_with_held_prefetches(tiny_deepseek, slots, depth, timing):
    path, prompt, ids, logits = tiny_deepseek
    model = load(path, timing, expert_slots=slots, cpu_experts="auto", hardware="rtx4090-pcie4",
                 predictor="cross_layer", prefetch_depth=depth)
    assert torch.equal(model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0), ids)
    with torch.no_grad():
        assert_close(model(ids).logits, logits, ("tiny-deepseek hybrid", slots, depth, timing))


_LATE_REFS: dict = {}
LATE_PROMPT = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(11))
LATE_GENERATE = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)


def late_reference(path) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' greedy continuation of LATE_PROMPT and its logits over the whole sequence."""
    if path not in _LATE_REFS:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        expected = ref.generate(LATE_PROMPT, **LATE_GENERATE)
        with torch.no_grad():
            _LATE_REFS[path] = expected, ref(expected).logits
    return _LATE_REFS[path]


@pytest.mark.parametrize("timing", ["deferred-1", "held-2"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("depth", [1, 2, 3], ids=lambda depth: f"depth{depth}")
@pytest.mark.parametrize(("family", "slots"), layer_budgets(["mixtral", "deepseek_v3"]))
def test_every_policy_depth_and_budget_with_late_copies(checkpoints, family, slots, depth, policy, timing):
    path = checkpoints[family]
    expected, expected_logits = late_reference(path)
    model = load(path, timing, expert_slots=slots, cache_policy=policy, predictor="cross_layer",
                 prefetch_depth=depth)
    assert torch.equal(model.generate(LATE_PROMPT, **LATE_GENERATE), expected), (family, slots, depth, policy)
    with torch.no_grad():
        assert_close(model(expected).logits, expected_logits, (family, slots, depth, policy, timing))


def test_preload_counts_its_evictions(checkpoints):
    model = load(checkpoints["mixtral"], "deferred-1", expert_slots=2)
    assert model.offload.preload([(0, 0), (0, 1), (1, 0), (1, 1)]) == 4
    assert model.offload.stats.evictions.sum() == 2


@pytest.mark.parametrize("mode", ["never", "auto"])
def test_one_packed_readback_per_layer_call(tiny_deepseek, mode):
    """Counts, router scores and the predictor's rankings come back together: one readback per MoE layer
    call, plus one for the CPU experts' inputs on layers that run some."""
    path, prompt, ids, _ = tiny_deepseek
    model = load(path, "deferred-1", expert_slots=12, cpu_experts=mode, hardware="rtx4090-pcie4",
                 predictor="cross_layer", prefetch_depth=2)
    model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    engine, stats = model.offload.engine, model.offload.stats
    calls = int(stats.layer_calls.sum())
    assert engine.protocol.readback.reads == calls
    cpu_layers = engine._cpu_inputs.reads
    assert (cpu_layers == 0) if mode == "never" else (0 < cpu_layers <= calls)


def test_engine_plan_counts_the_link_backlog(tiny_deepseek, tmp_path):
    """One 1-token miss: copied over an idle link (98 us + device) but run on the CPU (196 us) when four
    expert copies (392 us) are still on the link ahead of it."""
    from moe_offload.runtime.cost import HardwareProfile
    from moe_offload.runtime.scheduler import COPY, CPU

    profile = HardwareProfile(name="backlog", h2d_gbps=1.0, copy_latency_us=0.0, gpu_mem_gbps=1e4, gpu_tflops=1e3,
                              gpu_launch_us=0.0, cpu_mem_gbps=0.5, cpu_gflops=1e3, cpu_start_us=0.0)
    path = tiny_deepseek[0]
    model = load(path, "deferred-1", expert_slots=8, cpu_experts="auto", hardware=str(profile.to_yaml(tmp_path / "b.yaml")))
    engine = model.offload.engine
    counts = [0] * engine.store.num_experts
    counts[3] = 1
    assert engine.protocol.plan({3: -1}, counts).placement == {3: COPY}
    engine.copier.backend.land_probability = 0.0
    for slot in range(4):
        engine.copier.copy(100 + slot, slot)
    assert engine.copier.backlog_bytes() == 4 * engine.store.bytes_per_expert
    assert engine.protocol.plan({3: -1}, counts).placement == {3: CPU}
