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


# ----------------------------------------------------------------------------- names come from the registries


def test_config_accepts_exactly_the_registries_runtime_names():
    from moe_offload.cache import ALLOCATIONS, POLICIES, SIMULATION_ONLY
    from moe_offload.predictor import PREDICTORS

    for name, entry in PREDICTORS.items():
        if entry.runtime:
            assert OffloadConfig(device="cpu", predictor=name).resolved_predictor == name
        else:
            with pytest.raises(MoEOffloadError, match=rf"predictor '{name}' .* exists only in the simulator"):
                OffloadConfig(device="cpu", predictor=name)
    assert OffloadConfig(device="cpu", predictor="none").resolved_predictor == "none"
    with pytest.raises(MoEOffloadError, match="unknown predictor 'psychic'; choose one of none, cross_layer"):
        OffloadConfig(device="cpu", predictor="psychic")
    for name in POLICIES:
        assert OffloadConfig(device="cpu", cache_policy=name).cache_policy == name
    for name in SIMULATION_ONLY:
        with pytest.raises(MoEOffloadError, match=rf"cache_policy '{name}' needs the future routing"):
            OffloadConfig(device="cpu", cache_policy=name)
    for name, allocation in ALLOCATIONS.items():
        if allocation.needs_miss_curves:
            with pytest.raises(MoEOffloadError, match=rf"slot_allocation '{name}' needs per-layer miss curves"):
                OffloadConfig(device="cpu", slot_allocation=name)
        else:
            assert OffloadConfig(device="cpu", slot_allocation=name).slot_allocation == name
    with pytest.raises(MoEOffloadError, match="unknown slot_allocation 'diagonal'"):
        OffloadConfig(device="cpu", slot_allocation="diagonal")


def test_registry_entries_declare_what_they_need():
    from moe_offload.cache import POLICIES, SIMULATION_ONLY, ExpertLayout, make_policy
    from moe_offload.predictor import PREDICTORS, RUNTIME_PREDICTORS

    assert not set(POLICIES) & set(SIMULATION_ONLY)
    assert all(cls.needs_future for cls in SIMULATION_ONLY.values())
    assert not any(cls.needs_future for cls in POLICIES.values())
    for name, cls in POLICIES.items():
        assert make_policy(name, ExpertLayout(2, 4, 2)).name == name
        if cls.needs_layout:
            with pytest.raises(ValueError, match="needs the model's ExpertLayout"):
                make_policy(name)
        else:
            assert make_policy(name).name == name
    assert RUNTIME_PREDICTORS == ("none", *(n for n, e in PREDICTORS.items() if e.runtime))
    assert all(not (e.needs_fit_trace or e.needs_replay_trace) for e in PREDICTORS.values() if e.runtime)


def test_sweep_cli_accepts_exactly_the_registries_names(tmp_path, capsys):
    from moe_offload.cache import ALLOCATIONS, POLICIES, SIMULATION_ONLY
    from moe_offload.cli import build_parser, main
    from moe_offload.cli.sweep import parse_policies, parse_predictors
    from moe_offload.predictor import PREDICTORS

    parser = build_parser()
    names = ["none", *PREDICTORS, "oracle@0.8", "oracle@1"]
    assert parse_predictors(",".join(names), simulate=True) == names
    for bad in ("psychic", "oracle@1.5", "oracle@", "cross_layer,psychic"):
        with pytest.raises(MoEOffloadError, match="unknown predictor"):
            parse_predictors(bad, simulate=True)
    for name in ALLOCATIONS:
        assert parser.parse_args(["sweep", "--allocation", name, "--out", "x"]).allocation == name
    with pytest.raises(MoEOffloadError, match="invalid choice"):
        parser.parse_args(["sweep", "--allocation", "diagonal", "--out", "x"])
    assert parse_policies(",".join([*POLICIES, *SIMULATION_ONLY]), simulate=True)[0] == [*POLICIES, *SIMULATION_ONLY]
    for name, entry in PREDICTORS.items():   # without --simulate the engine runs: runtime predictors only
        if not entry.runtime:
            assert main(["sweep", "--model", "/no/such/dir", "--predictor", name, "--out", str(tmp_path)]) == 2
            assert "exists only in the simulator" in capsys.readouterr().err
