"""Offline batch projection (sweep --simulate --batch, plan --batch): steps of B streams, the batch's KV in host
memory, and projections that never beat their physical bound."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_offload.cli import main
from moe_offload.errors import MoEOffloadError
from moe_offload.loading.config import OffloadConfig, parse_bytes
from moe_offload.loading.parts import ModelParts
from moe_offload.predictor.synthetic import SyntheticTraceConfig, synthetic_trace
from moe_offload.simulate.calls import RoutingArrays
from moe_offload.simulate.offline import OfflineSetup, batched_trace, host_split, parse_batches
from moe_offload.simulate.plan import PlanRequest, plan_offline

GPU = "64.92MiB"   # the tiny checkpoint's dense weights, KV reserve and workspace, and some of its 24 experts


def test_a_batched_trace_is_one_call_per_step_of_token_s_of_every_stream():
    trace = synthetic_trace(SyntheticTraceConfig(tokens=24, layers=2, experts=8, top_k=2, seed=3))
    batched = batched_trace(trace, batch=4, steps=6)
    spans = RoutingArrays.of(batched).spans()
    assert spans.tolist() == [[s * 4, (s + 1) * 4] for s in range(6)]          # one router call per step
    for s in range(6):
        for j in range(4):                       # stream j holds tokens j*6 .. j*6+5, step s its s-th
            assert np.array_equal(batched.expert_ids[s * 4 + j], trace.expert_ids[j * 6 + s])
    with pytest.raises(MoEOffloadError, match="needs 28 tokens"):
        batched_trace(trace, batch=4, steps=7)


def test_the_batchs_kv_comes_out_of_host_memory_first(mixtral_dir):
    plan = ModelParts(str(mixtral_dir), OffloadConfig(device="cpu", gpu_memory=parse_bytes(GPU))).plan
    setup = OfflineSetup((1,), prompt_tokens=100, new_tokens=28)
    kv_per_token = 1000
    assert host_split(plan, None, 1, kv_per_token, setup)[:2] == (None, 0)     # fits the device's reserve
    big = 10 * plan.kv_reserve_bytes // (128 * kv_per_token) + 1              # a batch whose KV does not
    host = plan.expert_bytes + big * 128 * kv_per_token
    rows, host_kv, why = host_split(plan, host, big, kv_per_token, setup)
    assert (rows, host_kv, why) == (None, big * 128 * kv_per_token, None)      # every expert still fits
    rows, _, why = host_split(plan, host - 3 * plan.bytes_per_expert, big, kv_per_token, setup)
    assert rows == plan.num_experts - 3 and why is None                        # the disk tier takes the rest
    rows, _, why = host_split(plan, big * 128 * kv_per_token, big, kv_per_token, setup)
    assert "fewer than one layer" in why


def test_plan_offline_never_beats_the_bound_and_copies_less_per_token_at_larger_batches(mixtral_dir):
    request = PlanRequest(str(mixtral_dir), parse_bytes(GPU), hardware="rtx4090-pcie4", progress=False)
    choices = plan_offline(request, OfflineSetup((1, 8, 32), 16, 8), formats=(None, "int8"))
    assert [c.batch for c in choices] == [1, 8, 32]
    for choice in choices:
        assert {r["expert_dtype"] for r in choice.rows} == {"checkpoint", "int8"}
        assert choice.best == max(choice.rows, key=lambda r: r["tokens_per_s"])
        for r in choice.rows:
            assert 0 < r["tokens_per_s"] <= r["bound_kv_tokens_per_s"] * (1 + 1e-9) <= \
                r["bound_tokens_per_s"] * (1 + 1e-9)
    per_token = [next(r for r in c.rows if r["expert_dtype"] == "checkpoint")["bytes_copied_per_token"] for c in choices]
    assert per_token[2] < per_token[0]


def test_sweep_batch_writes_a_row_per_batch_size_and_refuses_without_simulate(mixtral_dir, tmp_path, capsys):
    assert main(["sweep", "--model", str(mixtral_dir), "--batch", "4", "--out", str(tmp_path)]) == 2
    assert "add --simulate" in capsys.readouterr().err
    with pytest.raises(MoEOffloadError, match="positive batch sizes"):
        parse_batches("4,0")
    args = ["sweep", "--model", str(mixtral_dir), "--simulate", "--synthetic", "--synthetic-tokens", "64",
            "--budgets", "50%", "--policies", "score", "--batch", "1,16", "--prompt-tokens", "16", "--new-tokens", "8",
            "--host-memory", "1GiB,4KiB", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["results"]
    fitting = [r for r in rows if r["fits"]]
    assert sorted(r["batch"] for r in fitting) == [1, 16] and {r["host_memory"] for r in fitting} == {"1GiB"}
    assert {(r["batch"], r["host_memory"]) for r in rows if not r["fits"]} == {(1, "4KiB"), (16, "4KiB")}
    assert (tmp_path / "sweep.png").stat().st_size > 0 and "batch" in (tmp_path / "sweep.csv").read_text()
    assert "does not fit" in capsys.readouterr().out
