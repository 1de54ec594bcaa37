"""The moe-offload command line: run and info, and their errors."""

from __future__ import annotations

import shutil

import pytest

from moe_offload.cli import main

from tiny_checkpoints import add_char_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, mixtral_dir):
    return add_char_tokenizer(shutil.copytree(mixtral_dir, tmp_path_factory.mktemp("cli") / "m"))


def test_run_streams_text_then_stats(model_dir, capsys):
    rc = main(["run", "def f(x):", "--model", str(model_dir), "--expert-slots", "4", "--device", "cpu",
               "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("def f(x):")
    text, stats = out.rstrip("\n").rsplit("\n", 1)
    assert len(text) > len("def f(x):")
    assert stats.startswith("[moe-offload] prefill") and "decode" in stats and "hit rate" in stats
    assert "4/24 experts on cpu" in stats


def test_info_reports_sizes_and_budget(model_dir, capsys):
    assert main(["info", "--model", str(model_dir), "--expert-slots", "2"]) == 0
    out = capsys.readouterr().out
    assert "bytes per expert" in out and "9.00 KiB (9,216 bytes)" in out
    assert "24 (3 MoE layers x 8)" in out
    assert "one expert per MoE layer  no" in out


@pytest.mark.parametrize("argv,message", [
    (["run", "--model", "/no/such/dir"], "does not exist"),
    (["info", "--model", "/no/such/dir"], "does not exist"),
    (["info", "--gpu-memory", "1KB"], "smaller than the dense weights"),
    (["info", "--gpu-memory", "lots"], "cannot read memory size"),
])
def test_errors_exit_2_with_one_line(argv, message, model_dir, capsys):
    if "--model" not in argv:
        argv = argv + ["--model", str(model_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("moe-offload: error:") and "\n" not in err


def test_calibrate_writes_a_profile_the_engine_loads(model_dir, tmp_path, capsys):
    from moe_offload.loading.loader import from_pretrained
    from moe_offload.runtime.cost import HardwareProfile

    out = tmp_path / "here.yaml"
    assert main(["calibrate", "--model", str(model_dir), "--device", "cpu", "--out", str(out), "--repeats", "3"]) == 0
    profile = HardwareProfile.from_yaml(out)
    assert min(profile.h2d_gbps, profile.cpu_mem_gbps, profile.gpu_mem_gbps) > 0
    assert "measured by moe-offload calibrate" in profile.source
    model = from_pretrained(model_dir, device="cpu", expert_slots=4, cpu_experts="auto", hardware=str(out),
                            progress=False)
    assert model.offload.engine.protocol.costs.copy_s() > 0


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-offload: error:") and "\n" not in err, err
    return err


@pytest.fixture
def bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("device: [cpu\nexpert_slots: 2\n")
    return path


TRACE = ["trace", "--stdlib-heldout", "1", "--out", "t.npz"]
FIT = ["fit-predictor", "--stdlib-train", "1"]
SWEEP = ["sweep", "--out", "sweep-out"]


@pytest.mark.parametrize("argv,message", [
    (["run", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["run", "--max-new-tokens", "-4"], "--max-new-tokens"),
    (["run", "--max-new-tokens", "many"], "--max-new-tokens"),
    (["run", "--temperature", "-0.5"], "--temperature"),
    (["run", "--temperature", "nan"], "--temperature"),
    (["run", "--device", "gpu"], "device 'gpu'"),
    (["info", "--device", "gpu"], "device 'gpu'"),
    (["info", "--device", "cuda:x"], "device 'cuda:x'"),
    (["run", "--config", "{bad_yaml}"], "is not valid YAML"),
    (["info", "--config", "{bad_yaml}"], "is not valid YAML"),
    (["info", "--expert-slots", "0"], "--expert-slots"),
    (["calibrate", "--repeats", "0"], "--repeats"),
    (["calibrate", "--cpu-threads", "0"], "--cpu-threads"),
    (["calibrate", "--device", "gpu"], "device 'gpu'"),
    ([*TRACE, "--max-new-tokens", "0"], "--max-new-tokens"),
    (["trace", "--stdlib-heldout", "0", "--out", "t.npz"], "--stdlib-heldout"),
    (["trace", "--stdlib-train", "-1", "--out", "t.npz"], "--stdlib-train"),
    ([*TRACE, "--prompt-lines", "0"], "--prompt-lines"),
    ([*TRACE, "--device", "gpu"], "device 'gpu'"),
    (["trace", "--stdlib-heldout", "1"], "--out"),
    ([*FIT, "--distances", "0"], "--distances"),
    ([*FIT, "--max-new-tokens", "-1"], "--max-new-tokens"),
    ([*SWEEP, "--prompts", "0"], "--prompts"),
    ([*SWEEP, "--prompt-tokens", "0"], "--prompt-tokens"),
    ([*SWEEP, "--new-tokens", "-2"], "--new-tokens"),
    ([*SWEEP, "--synthetic-tokens", "0"], "--synthetic-tokens"),
    ([*SWEEP, "--device", "gpu"], "device 'gpu'"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, model_dir, bad_yaml, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [str(bad_yaml) if a == "{bad_yaml}" else a for a in argv] + ["--model", str(model_dir)]
    assert message in _one_line_error(argv, capsys)
    assert not list(tmp_path.glob("*.npz")) and not (tmp_path / "sweep-out").exists()


@pytest.mark.parametrize("command", ["run", "info"])
def test_checkpoint_missing_one_projection_exit_2(command, model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(model_dir, tmp_path / "broken")
    name = "model.layers.1.block_sparse_moe.experts.1.w1.weight"
    tensors = load_file(broken / "model.safetensors")
    del tensors[name]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    extra = ["--max-new-tokens", "2"] if command == "run" else []
    err = _one_line_error([command, "--model", str(broken), "--device", "cpu", *extra], capsys)
    assert name in err


def test_calibrate_saves_by_name_outside_the_package(model_dir, tmp_path, monkeypatch, capsys):
    from moe_offload.runtime.cost import (
        HardwareProfile,
        resolve_profile,
        shipped_profile_dir,
    )

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert main(["calibrate", "--model", str(model_dir), "--device", "cpu", "--name", "my-box", "--repeats", "1"]) == 0
    saved = tmp_path / "config" / "moe-offload" / "hardware" / "my-box.yaml"
    assert saved.is_file() and f"wrote {saved}" in capsys.readouterr().out
    assert resolve_profile("my-box") == saved and HardwareProfile.from_yaml("my-box").name == "my-box"
    assert not (shipped_profile_dir() / "my-box.yaml").exists()
