"""`run --plan`: the plan is searched once per profile, checkpoint and memory, kept beside the profile, read
back on the next run, searched again when the profile or the checkpoint changes, and it is what `run` runs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import yaml

from moe_offload.cli import main
from moe_offload.loading import loader
from moe_offload.runtime.cost import HardwareProfile
from moe_offload.simulate import plan_cache

from tiny_checkpoints import add_char_tokenizer

GPU = "64.92MiB"   # the tiny checkpoint's dense weights, KV reserve and workspace, and some of its 24 experts


@pytest.fixture
def model_dir(tmp_path, mixtral_dir):
    return add_char_tokenizer(shutil.copytree(mixtral_dir, tmp_path / "m"))


@pytest.fixture
def profile(tmp_path, monkeypatch):
    """A calibrated profile of this machine (the shipped RTX 4090 one, saved where `calibrate` saves)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    from moe_offload.runtime.cost import user_profile_dir

    return HardwareProfile.from_yaml("rtx4090-pcie4").to_yaml(user_profile_dir() / "local.yaml")


@pytest.fixture
def searches(monkeypatch):
    """Counts the plan searches and records the OffloadConfig each `run` loads with."""
    seen = {"searches": 0, "configs": []}
    search, load = plan_cache.plan, loader.from_pretrained

    def counted(request):
        seen["searches"] += 1
        return search(dataclasses.replace(request, tokens=30, workers=1, progress=False))

    def recorded(model, cfg=None, **kwargs):
        seen["configs"].append(cfg)
        return load(model, cfg, **kwargs)

    monkeypatch.setattr(plan_cache, "plan", counted)
    monkeypatch.setattr(loader, "from_pretrained", recorded)
    return seen


def run_planned(model_dir, *extra) -> int:
    return main(["run", "def f(x):", "--model", str(model_dir), "--plan", *extra, "--device", "cpu",
                 "--gpu-memory", GPU, "--max-new-tokens", "3"])


def test_run_plan_searches_once_and_runs_the_plan(model_dir, profile, searches, capsys):
    assert run_planned(model_dir) == 0
    first = capsys.readouterr().out
    assert searches["searches"] == 1 and "[moe-offload] planned:" in first
    plans = list((profile.parent / "plans").glob("*.yaml"))
    assert len(plans) == 1
    planned = yaml.safe_load(plans[0].read_text())
    assert planned["hardware"] == str(profile)
    assert run_planned(model_dir) == 0                                  # the cached plan
    assert searches["searches"] == 1 and f"plan read from {plans[0]}" in capsys.readouterr().out
    for cfg in searches["configs"]:                                     # what `run` ran is the plan
        assert {k: getattr(cfg, k) for k in planned} == planned


def test_a_changed_profile_or_checkpoint_plans_again(model_dir, profile, searches):
    assert run_planned(model_dir) == 0
    slower = dataclasses.replace(HardwareProfile.from_yaml(profile), h2d_gbps=2.0)
    slower.to_yaml(profile)                                             # a new `calibrate`
    assert run_planned(model_dir) == 0 and searches["searches"] == 2
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"transformers_version": "0.0.0"}))
    assert run_planned(model_dir) == 0 and searches["searches"] == 3
    assert run_planned(model_dir) == 0 and searches["searches"] == 3
    assert len(list((profile.parent / "plans").glob("*.yaml"))) == 3


def test_a_named_profile_keeps_its_plans_beside_it(model_dir, profile, searches, tmp_path):
    other = HardwareProfile.from_yaml("h100-pcie5").to_yaml(tmp_path / "hw" / "h100.yaml")
    assert run_planned(model_dir, str(other)) == 0
    assert len(list((other.parent / "plans").glob("*.yaml"))) == 1
    assert searches["configs"][-1].hardware == str(other)


def test_plan_without_a_profile_or_with_config_is_refused(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    assert run_planned(model_dir) == 2
    assert "moe-offload calibrate" in capsys.readouterr().err
    assert run_planned(model_dir, "rtx4090-pcie4", "--config", str(tmp_path / "x.yaml")) == 2
    assert "either --plan or --config" in capsys.readouterr().err


def test_serve_takes_plan_as_run_does(model_dir, profile, searches):
    from moe_offload.cli import build_parser
    from moe_offload.cli.common import offload_config

    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--plan", "--device", "cpu",
                                      "--gpu-memory", GPU])
    cfg = offload_config(args)              # what `serve` loads the model with
    assert searches["searches"] == 1 and cfg.hardware == str(profile)
    assert cfg.prefetch_depth is not None and cfg.cpu_experts is not None
