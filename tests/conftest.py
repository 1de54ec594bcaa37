"""Shared fixtures: tiny checkpoints per family, written once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_checkpoints import FAMILIES, make_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {family: make_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def mixtral_dir(checkpoints) -> Path:
    return checkpoints["mixtral"]
