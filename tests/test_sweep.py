"""`moe-offload sweep`: real-engine and simulated sweeps write csv, json and png with the schema."""

from __future__ import annotations

import csv
import json

import pytest

from moe_offload.cli import main
from moe_offload.loading.config import device_defaults

SCHEMA = {"policy": str, "budget_bytes": int, "budget_fraction": float, "hit_rate": float,
          "bytes_copied_per_token": float, "tokens_per_s": float}


def read_outputs(out) -> dict:
    assert (out / "sweep.png").stat().st_size > 10_000
    payload = json.loads((out / "sweep.json").read_text())
    assert isinstance(payload["model"], str) and isinstance(payload["hardware"], str)
    for row in payload["results"]:
        for key, kind in SCHEMA.items():
            assert isinstance(row[key], kind), (key, row)
        assert 0.0 <= row["hit_rate"] <= 1.0 and 0.0 < row["budget_fraction"] <= 1.0
    with (out / "sweep.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(payload["results"])
    return payload


def test_engine_sweep(mixtral_dir, tmp_path, capsys):
    out = tmp_path / "engine"
    argv = ["sweep", "--model", str(mixtral_dir), "--device", "cpu", "--budgets", "25%,100%",
            "--policies", "lru,score,belady", "--prompts", "1", "--prompt-tokens", "6", "--new-tokens", "3",
            "--out", str(out)]
    assert main(argv) == 0
    payload = read_outputs(out)
    rows = payload["results"]
    assert payload["hardware"] == "cpu" and not payload["simulated"]
    assert [(r["policy"], r["slots"]) for r in rows] == [("lru", 6), ("lru", 24), ("score", 6), ("score", 24)]
    assert rows[0]["budget_fraction"] == 0.25 and rows[0]["budget_bytes"] == 6 * 9216
    assert "belady" in payload["notes"][0] and "simulation only" in capsys.readouterr().out


def test_simulated_sweep_on_a_synthetic_trace(mixtral_dir, tmp_path):
    out = tmp_path / "sim"
    argv = ["sweep", "--model", str(mixtral_dir), "--device", "cpu", "--simulate", "--synthetic",
            "--synthetic-tokens", "200", "--hardware", "h100-pcie5", "--budgets", "25%,50%,100%",
            "--policies", "lru,score,arc,belady", "--out", str(out)]
    assert main(argv) == 0
    payload = read_outputs(out)
    assert payload["hardware"] == "h100-pcie5" and payload["simulated"]
    rate = {(r["policy"], r["budget"]): r["hit_rate"] for r in payload["results"]}
    for budget in ("25%", "50%"):
        assert all(rate[(p, budget)] <= rate[("belady", budget)] for p in ("lru", "score", "arc"))
    assert rate[("lru", "100%")] == rate[("belady", "100%")]    # everything fits: only first uses miss


def test_simulated_sweep_records_a_trace_and_uses_the_hybrid_scheduler(mixtral_dir, tmp_path):
    out = tmp_path / "rec"
    argv = ["sweep", "--model", str(mixtral_dir), "--device", "cpu", "--simulate", "--cpu-experts", "auto",
            "--budgets", "50%,70MiB", "--policies", "score", "--prompts", "1", "--prompt-tokens", "6",
            "--new-tokens", "3", "--allocation", "dp", "--out", str(out)]
    assert main(argv) == 0
    rows = read_outputs(out)["results"]
    assert rows[1]["budget"] == "70MiB" and 1 <= rows[1]["slots"] <= 24


def simulated(model_dir, out, *argv) -> tuple[dict, dict]:
    """(sweep.json, its rows by (policy, budget)) of a --simulate sweep at 25% and 50% for lru and score."""
    assert main(["sweep", "--model", str(model_dir), "--device", "cpu", "--simulate", "--budgets", "25%,50%",
                 "--policies", "lru,score", "--out", str(out), *argv]) == 0
    payload = read_outputs(out)
    return payload, {(r["policy"], r["budget"]): r for r in payload["results"]}


def test_simulated_sweep_places_misses_with_the_hybrid_scheduler_by_default(mixtral_dir, tmp_path):
    def sweep(*extra):
        payload, rows = simulated(mixtral_dir, tmp_path / "-".join(extra or ("default",)), "--synthetic",
                                  "--synthetic-tokens", "200", "--hardware", "h100-pcie5", *extra)
        return payload["cpu_experts"], rows

    mode, hybrid = sweep()
    assert mode == "auto"
    depth = json.loads((tmp_path / "default" / "sweep.json").read_text())["prefetch_depth"]
    assert depth == device_defaults("cuda")["prefetch_depth"]          # the searched runtime default
    _, copies = sweep("--cpu-experts", "never")
    _, cpu = sweep("--cpu-experts", "always")
    for run in hybrid:
        assert cpu[run]["bytes_copied_per_token"] == 0 and cpu[run]["hit_rate"] == 0   # misses never cached
        assert 0 < hybrid[run]["bytes_copied_per_token"] < copies[run]["bytes_copied_per_token"]
        assert hybrid[run]["tokens_per_s"] > copies[run]["tokens_per_s"]


def test_simulated_sweep_replays_prefetch_with_a_predictor(mixtral_dir, tmp_path, capsys):
    def sweep(*extra):
        payload, rows = simulated(mixtral_dir, tmp_path / "-".join(extra or ("none",)), "--prompts", "2",
                                  "--prompt-tokens", "8", "--new-tokens", "12", *extra)
        return payload["predictor"], rows

    name, _ = sweep()
    assert name == "cross_layer"   # the runtime's default on a GPU: the trace was recorded with gate inputs
    name, plain = sweep("--predictor", "none")
    assert name == "none"
    for predictor in ("previous", "cross_layer"):
        name, fetched = sweep("--predictor", predictor)
        assert name == predictor
        for run in plain:   # prefetches are copies too
            assert fetched[run]["bytes_copied_per_token"] > plain[run]["bytes_copied_per_token"]
    argv = ["sweep", "--model", str(mixtral_dir), "--device", "cpu", "--simulate", "--synthetic",
            "--predictor", "cross_layer", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "needs gate inputs" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["sweep", "--help"])
    assert stop.value.code == 0 and "--simulate" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--budgets", "12"], "needs a unit"),
    (["--budgets", "lots"], "cannot read memory size"),
    (["--budgets", "150%"], "must be in"),
    (["--policies", "fifo"], "unknown cache policies"),
    (["--allocation", "dp"], "use it with --simulate"),
    (["--synthetic"], "add --simulate"),
])
def test_sweep_errors(mixtral_dir, tmp_path, capsys, argv, message):
    assert main(["sweep", "--model", str(mixtral_dir), "--device", "cpu", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_per_layer_allocation_skips_budgets_below_one_slot_per_layer(mixtral_dir, tmp_path):
    out = tmp_path / "uniform"
    argv = ["sweep", "--model", str(mixtral_dir), "--device", "cpu", "--simulate", "--synthetic",
            "--synthetic-tokens", "100", "--allocation", "uniform", "--budgets", "5%,50%", "--policies", "lru",
            "--out", str(out)]
    assert main(argv) == 0
    payload = read_outputs(out)
    assert [r["budget"] for r in payload["results"]] == ["50%"]
    assert "5%: 1 slots < 3 MoE layers" in payload["notes"][0]


def test_simulated_gate_predictor_reads_router_params_without_the_experts(mixtral_dir, tmp_path, monkeypatch):
    import torch

    from moe_offload.loading import router_params as router_module
    from moe_offload.loading.checkpoint import Checkpoint
    from moe_offload.loading.loader import from_pretrained
    from moe_offload.runtime.tracing import record_trace

    model = from_pretrained(mixtral_dir, device="cpu", progress=False)
    want = router_module.router_params(model).to("cpu")
    prompt = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    trace = record_trace(model, None, [prompt], 6, gate_inputs=True, progress=False).save(tmp_path / "t.npz")
    model.offload.close()
    reads, got, get, build = [], [], Checkpoint.get, router_module.router_params

    def fail(*args, **kwargs):
        raise AssertionError("a simulated sweep must not load the experts")

    monkeypatch.setattr(Checkpoint, "get", lambda self, name: reads.append(name) or get(self, name))
    monkeypatch.setattr(router_module, "router_params", lambda source: got.append(build(source)) or got[-1])
    monkeypatch.setattr("moe_offload.loading.loader.HostExpertStore", fail)
    monkeypatch.setattr("moe_offload.loading.loader.fill_store", fail)
    payload, rows = simulated(mixtral_dir, tmp_path / "out", "--trace", str(trace), "--predictor", "cross_layer")
    assert payload["predictor"] == "cross_layer" and len(rows) == 4 and len(got) == 1
    params = got[0].to("cpu")
    for mine, theirs in zip([*params.weights, *params.norm_weights], [*want.weights, *want.norm_weights], strict=True):
        assert torch.equal(mine, theirs)
    assert reads and not [name for name in reads if ".experts." in name]
