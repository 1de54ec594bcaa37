"""Exact-size pinning: registration, fallbacks with a warning, lifetime of the registration, close()."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from moe_offload.transfer import ExpertShape, HostExpertStore, pinning

SHAPE = ExpertShape(hidden=8, intermediate=4)


class FakeCudart:
    """Stands in for cudaHostRegister/Unregister; records every call."""

    def __init__(self, register_code: int = 0):
        self.register_code = register_code
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def register(self, ptr: int, nbytes: int) -> int:
        self.registered.append((ptr, nbytes))
        return self.register_code

    def unregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def cudart(monkeypatch) -> FakeCudart:
    fake = FakeCudart()
    monkeypatch.setattr(pinning, "cuda_ready", lambda: True)
    monkeypatch.setattr(pinning, "host_register", fake.register)
    monkeypatch.setattr(pinning, "host_unregister", fake.unregister)
    return fake


def make_store(pin: bool = True) -> HostExpertStore:
    return HostExpertStore(2, 3, SHAPE, torch.bfloat16, pin=pin)


def test_registered_store_is_exact_size_and_page_aligned(cudart):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = make_store()
    assert store.pinning == "registered" and store.pinned
    (ptr, nbytes), = cudart.registered
    assert nbytes == store.nbytes == 6 * SHAPE.numel * 2
    assert ptr == store.blocks.data_ptr() and ptr % pinning.PAGE == 0
    store.write(store.key(1, 2), "down", torch.ones(8, 4))
    assert store.block(store.key(1, 2))[SHAPE.gate_up_numel:].eq(1).all()


@pytest.mark.parametrize("error", ["code", "raises"])
def test_registration_failure_falls_back_to_torch_with_warning(cudart, monkeypatch, error):
    if error == "code":
        cudart.register_code = 2  # cudaErrorMemoryAllocation
    else:
        monkeypatch.setattr(pinning, "host_register", lambda ptr, n: (_ for _ in ()).throw(RuntimeError("boom")))
    monkeypatch.setattr(pinning, "torch_pinned_empty", lambda shape, dtype: torch.zeros(shape, dtype=dtype))
    with pytest.warns(RuntimeWarning, match="torch's allocator reserves"):
        store = make_store()
    assert store.pinning == "torch" and store.pinned
    store.write(0, "gate_up", torch.ones(8, 8))
    assert store.block(0)[:SHAPE.gate_up_numel].eq(1).all() and not cudart.unregistered


def test_everything_fails_leaves_the_store_unpinned_and_working(cudart, monkeypatch):
    cudart.register_code = 2

    def no_torch_pinning(shape, dtype):
        raise RuntimeError("out of pinned memory")

    monkeypatch.setattr(pinning, "torch_pinned_empty", no_torch_pinning)
    with pytest.warns(RuntimeWarning, match="unpinned.*synchronous and slower"):
        store = make_store()
    assert store.pinning == "none" and not store.pinned
    store.write(5, "down", torch.full((8, 4), 2.0))
    assert store.block(5)[SHAPE.gate_up_numel:].eq(2).all()


def test_no_cuda_warns_and_stays_pageable(monkeypatch):
    monkeypatch.setattr(pinning, "cuda_ready", lambda: False)
    with pytest.warns(RuntimeWarning, match="no CUDA device"):
        store = make_store()
    assert store.pinning == "none" and not store.pinned
    store.close()


def test_unpinned_store_does_not_register(cudart):
    store = make_store(pin=False)
    assert store.pinning == "none" and not store.pinned and not cudart.registered
    store.close()
    assert not cudart.unregistered


def test_unregister_waits_for_the_last_view(cudart):
    store = make_store()
    ptr = store.blocks.data_ptr()
    row = store.block(4)[3:9]       # a slice of one block: keeps the storage alive
    flat = store.blocks.view(-1)
    del store
    gc.collect()
    assert ptr not in cudart.unregistered
    del flat
    gc.collect()
    assert ptr not in cudart.unregistered
    row.fill_(1)                    # the memory is still valid while a view exists
    del row
    gc.collect()
    assert cudart.unregistered.count(ptr) == 1


def test_close_unregisters_now_and_is_idempotent(cudart):
    store = make_store()
    ptr = store.blocks.data_ptr()
    store.write(0, "down", torch.ones(8, 4))
    store.close()
    assert cudart.unregistered == [ptr]
    assert store.pinning == "none" and not store.pinned
    store.close()
    assert cudart.unregistered == [ptr]
    assert store.block(0)[SHAPE.gate_up_numel:].eq(1).all()   # still readable, synchronously
    del store
    gc.collect()
    assert cudart.unregistered == [ptr]                        # not a second time when the memory dies


@pytest.mark.parametrize("copiers", [[], ["cuda:1"], ["cuda:1", "cuda:0"]], ids=["current", "cuda1", "both"])
def test_unregister_waits_for_the_copiers_devices(cudart, monkeypatch, copiers):
    """Unpinning synchronizes every device whose copier reads the store (not only the current device), and
    only then unregisters."""
    events = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    monkeypatch.setattr(pinning, "host_unregister", lambda ptr: events.append(("unregister", ptr)) or 0)
    store = make_store()
    for device in copiers:
        store.copied_by(torch.device(device))
    store.copied_by(torch.device("cpu"))           # a CPU copier has no stream to wait for
    store.close()
    synced = sorted({torch.device(d).index for d in copiers}) or [0]
    assert events == [("sync", d) for d in synced] + [("unregister", cudart.registered[0][0])]


def test_close_after_torch_fallback(cudart, monkeypatch):
    cudart.register_code = 2
    monkeypatch.setattr(pinning, "torch_pinned_empty", lambda shape, dtype: torch.zeros(shape, dtype=dtype))
    with pytest.warns(RuntimeWarning):
        store = make_store()
    store.close()
    store.close()
    assert store.pinning == "none" and not store.pinned and not cudart.unregistered


def test_pinned_empty_keeps_its_signature(cudart):
    tensor, how = pinning.pinned_empty((5, 7), torch.float16)
    assert how == "registered" and tensor.shape == (5, 7) and tensor.dtype == torch.float16
    assert cudart.registered == [(tensor.data_ptr(), 70)]
    ptr = tensor.data_ptr()
    del tensor
    gc.collect()
    assert cudart.unregistered == [ptr]


@pytest.mark.cuda
def test_cuda_registration_is_real_and_async():
    store = HostExpertStore(2, 4, ExpertShape(hidden=256, intermediate=512), torch.bfloat16, pin=True)
    assert store.pinning == "registered", "cudaHostRegister failed on a CUDA machine"
    assert store.blocks.is_pinned()
    store.blocks.copy_(torch.arange(store.blocks.numel()).view_as(store.blocks) % 251)
    slot = torch.empty(store.shape.numel, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        slot.copy_(store.block(5), non_blocking=True)
    stream.synchronize()
    assert torch.equal(slot.cpu(), store.block(5))
    view = store.block(3)
    store.close()
    store.close()
    assert not store.pinned and not view.is_pinned()
    slot.copy_(view)                 # pageable now: a synchronous copy still works
    assert torch.equal(slot.cpu(), view)
    torch.cuda.synchronize()
