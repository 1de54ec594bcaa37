"""moe-offload plan: the simulator's search picks the fastest configuration it tried and writes a config
that `run --config` accepts."""

from __future__ import annotations

import shutil

import pytest

from moe_offload.cli import main
from moe_offload.loading.config import OffloadConfig, parse_bytes
from moe_offload.simulate.plan import PlanRequest, plan

from tiny_checkpoints import add_char_tokenizer

GPU = "64.92MiB"   # the tiny checkpoint's dense weights, KV reserve and workspace, and some of its 24 experts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, mixtral_dir):
    return add_char_tokenizer(shutil.copytree(mixtral_dir, tmp_path_factory.mktemp("plan") / "m"))


def test_plan_ranks_its_candidates_and_refines_around_the_best(model_dir):
    result = plan(PlanRequest(str(model_dir), parse_bytes(GPU), tokens=12, workers=1, progress=False))
    speeds = [c.decode_tokens_per_s for c in result.candidates]
    assert speeds == sorted(speeds, reverse=True) and len(speeds) >= 6
    best = result.best
    assert 0 < best.slots <= 24 and best.prefill_tokens_per_s > 0
    assert {c.expert_dtype for c in result.candidates} == {best.expert_dtype}   # refined around the best format
    assert {c.cell.policy for c in result.candidates} >= {"score", "lru", "arc"}
    assert result.predictor == "oracle@0.8" and "synthetic" in result.notes[-1]
    cfg = result.config(PlanRequest(str(model_dir), parse_bytes(GPU)))
    assert (cfg.prefetch_depth, cfg.cache_policy, cfg.expert_dtype) == \
        (best.cell.prefetch_depth, best.cell.policy, best.expert_dtype)


def test_run_accepts_the_plans_config(model_dir, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--model", str(model_dir), "--gpu-memory", GPU, "--tokens", "9", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best:" in printed and "decode" in printed and "prefill" in printed
    cfg = OffloadConfig.from_yaml(out)
    assert cfg.gpu_memory == parse_bytes(GPU) and cfg.predictor == "cross_layer"
    assert main(["run", "def f(x):", "--model", str(model_dir), "--config", str(out), "--device", "cpu",
                 "--max-new-tokens", "4"]) == 0
    assert "[moe-offload] prefill" in capsys.readouterr().out
