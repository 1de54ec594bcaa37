"""The per-call path reads the device back once per MoE layer (HostReadback.read) and nowhere else.

On CUDA any op whose output shape depends on values (bincount, unique, nonzero, masked_select), and any
``.item()``/``.tolist()``/``.cpu()`` of a device tensor, blocks the host until the device catches up. The
CUDA test runs decode steps under ``torch.cuda.set_sync_debug_mode("error")`` everywhere in the offloading
code but the one intended readback; the CPU test guards the same code against the value-dependent-shape ops,
so a regression fails CI without a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import moe_offload
from moe_offload.runtime.engine import Engine
from moe_offload.runtime.protocol import CallProtocol
from moe_offload.transfer.readback import HostReadback

from tiny_checkpoints import num_experts

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))  # [B, S]
VALUE_SHAPED = [(torch, "bincount"), (torch, "unique"), (torch, "unique_consecutive"), (torch, "nonzero"),
                (torch, "masked_select"), (torch.Tensor, "bincount"), (torch.Tensor, "unique"),
                (torch.Tensor, "nonzero"), (torch.Tensor, "masked_select"), (torch.Tensor, "item")]


def _guarded(monkeypatch, enter, leave) -> list[str]:
    """Run the router call and the experts call with ``enter()`` in force, the readback with ``leave()``;
    returns the names of the guarded calls that ran (so the test knows the guard saw the path)."""
    seen = []

    def around(cls, name, inside, outside):
        real = getattr(cls, name)

        def wrapped(*args, **kwargs):
            seen.append(f"{cls.__name__}.{name}")
            inside()
            try:
                return real(*args, **kwargs)
            finally:
                outside()
        monkeypatch.setattr(cls, name, wrapped)

    around(CallProtocol, "on_router", enter, leave)
    around(Engine, "run_layer", enter, leave)
    around(HostReadback, "read", leave, enter)      # the one intended sync of a layer
    return seen


def _forbid_value_shaped_ops(monkeypatch) -> tuple:
    """``enter``/``leave`` that make the value-dependent-shape ops raise while entered."""
    state = {"on": False}
    for owner, name in VALUE_SHAPED:
        real = getattr(owner, name)

        def guard(*args, _real=real, _name=name, **kwargs):
            if state["on"]:
                raise AssertionError(f"{_name} in the per-call path: its result's shape (or value) needs a "
                                     "host sync on CUDA; count into a fixed-size tensor instead")
            return _real(*args, **kwargs)
        monkeypatch.setattr(owner, name, guard)
    return (lambda: state.update(on=True)), (lambda: state.update(on=False))


@pytest.mark.parametrize("cpu_experts", ["never", "always"])
def test_no_value_shaped_ops_per_call(checkpoints, monkeypatch, cpu_experts):
    enter, leave = _forbid_value_shaped_ops(monkeypatch)
    seen = _guarded(monkeypatch, enter, leave)          # before loading: the router tap binds on_router then
    model = moe_offload.from_pretrained(checkpoints["mixtral"], device="cpu", dtype=torch.float32, progress=False,
                                        expert_slots=num_experts("mixtral"), predictor="cross_layer",
                                        prefetch_depth=2, copy_backend="deferred", cpu_experts=cpu_experts)
    with torch.no_grad():
        model.generate(TOKENS[:, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert {"CallProtocol.on_router", "Engine.run_layer", "HostReadback.read"} <= set(seen)


def test_the_guard_catches_bincount(monkeypatch):
    """The guard is live: the old per-layer count (torch.bincount) raises under it."""
    enter, _ = _forbid_value_shaped_ops(monkeypatch)
    enter()
    with pytest.raises(AssertionError, match="bincount"):
        torch.bincount(torch.tensor([0, 2, 2]), minlength=4)


@contextlib.contextmanager
def _sync_debug(mode: str):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.cuda
@pytest.mark.parametrize("cpu_experts", ["never", "auto"])
def test_decode_step_has_one_host_sync_per_layer(checkpoints, monkeypatch, cpu_experts):
    """Decode steps with prefetch and half of the three layers' experts resident: torch raises on any blocking sync in the
    router or experts call except the readback (and, with CPU experts, their input/output transfers, which
    go through the same page-locked readback)."""
    seen = _guarded(monkeypatch, lambda: torch.cuda.set_sync_debug_mode("error"),
                    lambda: torch.cuda.set_sync_debug_mode("default"))
    model = moe_offload.from_pretrained(checkpoints["mixtral"], device="cuda", dtype=torch.float32, progress=False,
                                        expert_slots=num_experts("mixtral") * 3 // 2, predictor="cross_layer",
                                        prefetch_depth=2, cpu_experts=cpu_experts, hardware="h100-pcie5")
    tokens = TOKENS[:, :4].cuda()
    with torch.no_grad(), _sync_debug("default"):
        model.generate(tokens, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert {"CallProtocol.on_router", "Engine.run_layer", "HostReadback.read"} <= set(seen)
