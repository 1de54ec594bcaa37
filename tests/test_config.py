"""OffloadConfig parsing and validation."""

import pytest
import torch

from moe_offload import MoEOffloadError, OffloadConfig
from moe_offload.loading.config import parse_bytes


@pytest.mark.parametrize("text,expected", [
    ("6GiB", 6 * 2**30), ("500MB", 500 * 10**6), ("1.5 gib", int(1.5 * 2**30)), ("123", 123), (4096, 4096),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["six gigs", "5 parsecs", "-3GB", 0, True])
def test_parse_bytes_rejects(bad):
    with pytest.raises(MoEOffloadError):
        parse_bytes(bad)


def test_fields_and_overrides():
    cfg = OffloadConfig(device="cpu", dtype="bf16", gpu_memory="2GiB")
    assert cfg.dtype is torch.bfloat16 and cfg.gpu_memory == 2 * 2**30
    slots = cfg.replace(expert_slots=4)
    assert slots.expert_slots == 4 and slots.gpu_memory is None
    with pytest.raises(MoEOffloadError, match="unknown OffloadConfig field"):
        cfg.replace(expert_slot=3)
    with pytest.raises(MoEOffloadError, match="either gpu_memory or expert_slots"):
        OffloadConfig(device="cpu", gpu_memory="1GB", expert_slots=2)
    with pytest.raises(MoEOffloadError, match="cache_policy"):
        OffloadConfig(device="cpu", cache_policy="random")
    with pytest.raises(MoEOffloadError, match="dtype"):
        OffloadConfig(device="cpu", dtype="int3")


def test_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("device: cpu\ndtype: float32\nexpert_slots: 5\ncache_policy: lru\n")
    cfg = OffloadConfig.from_yaml(path)
    assert (cfg.device, cfg.dtype, cfg.expert_slots) == ("cpu", torch.float32, 5)
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(MoEOffloadError, match="mapping"):
        OffloadConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(MoEOffloadError, match="does not exist"):
        OffloadConfig.from_yaml(tmp_path / "missing.yaml")


def test_cuda_requested_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(MoEOffloadError, match="no CUDA GPU"):
        OffloadConfig(device="cuda")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "", "mps", "meta", 3.5])
def test_unknown_device_is_rejected(device):
    with pytest.raises(MoEOffloadError, match="device"):
        OffloadConfig(device=device)


@pytest.mark.parametrize("text", ["device: [cpu\n", "a: b: c\n", "- a\nb: c\n", "{device: cpu\n", "\tdevice: cpu\n"])
def test_malformed_yaml_is_rejected(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MoEOffloadError, match=r"bad\.yaml is not valid YAML"):
        OffloadConfig.from_yaml(path)
