"""A normal (non-editable) install ships and finds its data: hardware profiles, tiny models, configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOT_BUILT = ("tests", "bench", "build", "dist", ".git", ".ci", "__pycache__", "*.egg-info", ".pytest_cache")
PROFILES = ("a100-pcie4", "h100-pcie5", "rtx4090-pcie4")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "predictor/learned-correction.safetensors")


def _can_build_wheels() -> str | None:
    """Why wheels cannot be built offline here, or None."""
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed"
    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    if (major, minor) < (70, 1):
        try:
            import wheel  # noqa: F401  (setuptools < 70.1 builds wheels through it)
        except ImportError:
            return f"setuptools {setuptools.__version__} needs the 'wheel' package to build wheels"
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    reason = _can_build_wheels()
    if reason:
        pytest.skip(f"cannot build a wheel offline: {reason} (pip install '.[test]' installs what it needs)")
    root = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(REPO, root / "src", ignore=shutil.ignore_patterns(*NOT_BUILT))  # build/ stays out of REPO
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-w", str(root / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (built,) = (root / "dist").glob("moe_offload-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked the way an installer lays it out in site-packages."""
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_wheel_holds_profiles_models_and_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for profile in PROFILES:
        assert f"moe_offload/configs/hardware/{profile}.yaml" in names
    assert "moe_offload/configs/offload-example.yaml" in names
    for model in ("tiny-mixtral", "tiny-deepseek"):
        for file in MODEL_FILES:
            assert f"moe_offload/models/{model}/{file}" in names
    for package in ("cache", "predictor", "transfer", "cpu_kernels", "configs", "models", "cli", "loading",
                    "loading/adapters", "runtime", "simulate"):
        assert f"moe_offload/{package}/__init__.py" in names


_PROBE = """
import json, sys
from pathlib import Path
import moe_offload
from moe_offload.cli import build_parser
from moe_offload.cli.common import offload_config
from moe_offload.runtime.cost import HardwareProfile, resolve_profile
from moe_offload.loading.checkpoint import resolve_model_dir
from moe_offload.loading.config import OffloadConfig

args = build_parser().parse_args(["sweep", "--simulate", "--synthetic", "--hardware", "rtx4090-pcie4", "--out", "x"])
profile = HardwareProfile.from_yaml(args.hardware)
cfg = OffloadConfig(device="cpu", hardware="h100-pcie5")
models = {name: str(resolve_model_dir(name)) for name in ("tiny-mixtral", "tiny-deepseek")}
print(json.dumps({
    "package": moe_offload.__file__,
    "profile": profile.name, "profile_path": str(resolve_profile("rtx4090-pcie4")),
    "config_profile": HardwareProfile.from_yaml(cfg.hardware).name,
    "models": models,
    "has_config": {n: (Path(p) / "config.json").is_file() for n, p in models.items()},
    "has_predictor": {n: (Path(p) / "predictor" / "learned-correction.safetensors").is_file()
                      for n, p in models.items()},
}))
"""


def test_installed_wheel_finds_its_files(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # -S: no site-packages, so neither the editable install nor the source tree is importable;
    # the dependencies (torch, transformers, ...) come through PYTHONPATH after the unpacked wheel.
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    env["PYTHONPATH"] = os.pathsep.join([str(installed), *deps])
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")   # no user profiles
    result = subprocess.run([sys.executable, "-S", "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(installed), found["package"]
    assert found["profile"] == "rtx4090-pcie4" and found["config_profile"] == "h100-pcie5"
    assert Path(found["profile_path"]).is_relative_to(installed)
    for name, path in found["models"].items():
        assert Path(path).is_relative_to(installed), (name, path)
        assert found["has_config"][name] and found["has_predictor"][name]
