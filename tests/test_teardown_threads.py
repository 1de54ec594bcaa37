"""Teardown (close, del without the cycle collector, repeated loads) and callers on several threads."""

from __future__ import annotations

import gc
import os
import threading
import weakref

import pytest
import torch
from conftest import live_objects

from moe_offload.models import shipped_model_dir

from copy_timing import load

FIELDS = dict(expert_slots=8, predictor="cross_layer", prefetch_depth=2, cpu_experts="auto",
              hardware="rtx4090-pcie4")


@pytest.fixture(scope="module")
def deepseek():
    return shipped_model_dir("tiny-deepseek")


def rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    return live_objects(torch.Tensor)


def test_del_frees_everything_without_the_cycle_collector(deepseek):
    model = load(deepseek, "deferred-1", **FIELDS)
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    refs = [weakref.ref(x) for x in (model, model.offload.engine, model.offload.store,
                                     model.offload.engine.copier, model.offload.router_tap)]
    model.offload.engine.copier.synchronize()
    gc.disable()
    try:
        del model
        assert [r() is None for r in refs] == [True] * len(refs)   # no reference cycle keeps them
    finally:
        gc.enable()


def test_close_releases_memory_and_the_model_refuses_to_run(deepseek):
    model = load(deepseek, "deferred-2", **FIELDS)
    routers = model.offload.router_tap.routers
    runner = model.offload.engine.cpu_runner
    with model.offload as runtime:
        model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert runtime.closed
    assert model.offload.store.blocks.numel() == 0
    assert model.offload.engine.cache.slots.buffers.numel() == 0
    assert all(not r._forward_hooks for r in routers)
    assert runner._executor._shutdown
    with pytest.raises(RuntimeError, match="closed"):
        model(torch.tensor([[1, 2]]))
    model.offload.close()   # idempotent


def test_load_and_close_five_times_returns_memory(deepseek):
    def cycle() -> int:
        model = load(deepseek, **FIELDS)
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        size = model.offload.store.nbytes
        model.offload.close()
        del model
        return size

    store_bytes = cycle()
    gc.collect()
    rss, tensors = rss_bytes(), live_tensors()
    for _ in range(5):
        cycle()
        gc.collect()
    assert live_tensors() == tensors
    assert rss_bytes() - rss < store_bytes, "five more loads must not keep a store's worth of memory"


@pytest.mark.parametrize("timing", ["immediate", "deferred-3"])
def test_threads_get_their_single_thread_tokens(deepseek, timing):
    prompts = [torch.tensor([[5 + i, 17, 42 * i % 500, 99, 7]]) for i in range(4)]
    gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    fields = dict(expert_slots=12, predictor="cross_layer", prefetch_depth=2)
    alone = [load(deepseek, timing, **fields).generate(p, **gen) for p in prompts]
    model = load(deepseek, timing, **fields)
    results, errors = [None] * len(prompts), []
    start = threading.Barrier(len(prompts))

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = model.generate(prompts[i], **gen)
        except BaseException as err:   # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for got, expected in zip(results, alone):
        assert torch.equal(got, expected)
