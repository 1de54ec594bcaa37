"""Shared fixtures: tiny checkpoints per family, written once per session; the logits parity check.

Test modules import the check and the budget params as ``from conftest import ...`` (this folder is on
sys.path).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_checkpoints import FAMILIES, make_checkpoint, num_experts  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Quantized-experts cache files of the tests go to a temporary folder, not the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {family: make_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def mixtral_dir(checkpoints) -> Path:
    return checkpoints["mixtral"]


# Relative error ||got - expected|| / ||expected|| (in float32) allowed per dtype: float32 math differs from
# transformers' only in summation order; half types round every activation.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def live_objects(cls) -> int:
    """How many objects the collector tracks are ``cls`` instances. A weak proxy whose referent is gone raises
    ReferenceError on isinstance (whatever left it in the heap): it is not an instance of anything."""
    def instance(o) -> bool:
        try:
            return isinstance(o, cls)
        except ReferenceError:
            return False
    return sum(instance(o) for o in gc.get_objects())


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||, computed in float32."""
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def assert_close(got: torch.Tensor, expected: torch.Tensor, what, dtype: torch.dtype | None = None) -> None:
    """Logits parity: ``got`` and ``expected`` have one shape and a relative error below the tolerance of
    ``dtype``. Without ``dtype`` both tensors must have the same dtype, whose tolerance applies. ``what``
    names the comparison in the failure message."""
    if dtype is None:
        assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != expected {expected.dtype}"
        dtype = got.dtype
    if dtype not in TOLERANCES:
        raise ValueError(f"{what}: no logits tolerance for {dtype}")
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != expected {tuple(expected.shape)}"
    tol, err = TOLERANCES[dtype], rel_err(got, expected)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e} ({dtype})"


def layer_budgets(families, everything: bool = False) -> list:
    """``(family, expert_slots)`` params for parametrize: 1, E // 2 and E slots (E: experts per MoE layer of
    the tiny ``family``), ids like ``mixtral-1slot``, ``mixtral-4slots``; with ``everything`` also
    ``mixtral-all``: no budget (None), every expert of every MoE layer has a slot."""
    params = []
    for family in families:
        e = num_experts(family)
        for slots in (1, e // 2, e):
            params.append(pytest.param(family, slots, id=f"{family}-{slots}slot{'s' * (slots > 1)}"))
        if everything:
            params.append(pytest.param(family, None, id=f"{family}-all"))
    return params


@pytest.fixture(scope="session")
def split_profile(tmp_path_factory):
    """A hardware profile under which 1-token misses run on the CPU and many-token misses are copied."""
    from moe_offload.runtime.cost import HardwareProfile

    profile = HardwareProfile(name="split", h2d_gbps=0.01, copy_latency_us=0.0, gpu_mem_gbps=1000.0,
                              gpu_tflops=1000.0, gpu_launch_us=0.0, cpu_mem_gbps=1.0, cpu_gflops=0.02,
                              cpu_start_us=0.0)
    return profile.to_yaml(tmp_path_factory.mktemp("hw") / "split.yaml")
