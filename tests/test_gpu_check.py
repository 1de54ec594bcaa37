"""bench/gpu_check.py: its budget, its helpers, and the dry run (--smoke) on CPU: every section runs and
reports within its cap, into --out, naming the device."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import moe_offload
from moe_offload.transfer.copy_engine import covered_length

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
SECTIONS = ["environment", "micro", "calibrate", "cuda_tests", "parity", "host_syncs", "chunk_size", "full_size",
            "host_wait", "planner", "e2e"]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module          # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_help_names_every_section_and_option():
    proc = run("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in SECTIONS + ["--dry-run", "--smoke", "--budget-s", "--out", "--checkpoint"]:
        assert name in proc.stdout


def test_caps_fit_the_budget_with_a_margin(gpu_check):
    assert [s.name for s in gpu_check.SECTIONS] == SECTIONS
    caps = sum(s.cap_s for s in gpu_check.SECTIONS)
    assert caps + gpu_check.MARGIN_S <= gpu_check.BUDGET_S == 420
    assert all(s.min_s < s.cap_s for s in gpu_check.SECTIONS)


def test_cuda_tests_name_the_files_with_cuda_tests(gpu_check):
    files = gpu_check.cuda_test_files()
    assert {"tests/test_parity.py", "tests/test_pinning.py", "tests/test_host_wait.py"} <= set(files)
    for name in files:
        assert "mark.cuda" in (ROOT / name).read_text()
    assert "tests/test_cache.py" not in files


def test_link_busy_time_counts_overlapping_copies_once():
    """copy GB/s divides by the link's busy time: two streams' overlapping copies are not summed."""
    assert covered_length([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]) == 4.0
    assert covered_length([(1.0, 2.0), (0.0, 1.0)]) == 2.0
    assert covered_length([]) == 0.0


def test_deferred_recorder_gives_the_runtime_recorders_trace(gpu_check):
    """The planner records routing without host syncs; its trace is the one TraceRecorder makes."""
    from moe_offload.runtime.tracing import TraceRecorder

    model = moe_offload.from_pretrained("tiny-mixtral", device="cpu", expert_slots=12, progress=False)
    tap = model.offload.router_tap
    plain = TraceRecorder(len(tap.routers), gate_inputs=True, scores_dtype=torch.float32)
    deferred = gpu_check.DeferredTraceRecorder(len(tap.routers))
    tap.add(plain)
    tap.add(deferred)
    with torch.inference_mode():
        for n in (5, 3):
            model.generate(torch.arange(1, 1 + n)[None], max_new_tokens=3, min_new_tokens=3, do_sample=False,
                           pad_token_id=0)
            plain.next_sequence()
            deferred.next_sequence()
    want, got = plain.trace({}), deferred.trace({})
    for field in ("expert_ids", "router_probs", "sequence", "decode", "gate_inputs"):
        assert (getattr(want, field) == getattr(got, field)).all(), field
    assert got.num_tokens == 5 + 2 + 3 + 2 and got.decode.sum() == 4


def test_checkpoint_build_stops_when_asked(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from full_size import BuildStopped, smoke_config, write_random

    stop = threading.Event()
    stop.set()
    with pytest.raises(BuildStopped, match="stopped after 0 of"):
        write_random(smoke_config(torch.bfloat16), tmp_path / "stopped", 1.0, stop=stop)
    config = smoke_config(torch.bfloat16)
    config.num_hidden_layers = 2
    path = write_random(config, tmp_path / "built", 1e-3)
    model = moe_offload.from_pretrained(path, device="cpu", expert_slots=4, progress=False)
    with torch.inference_mode():
        assert model(torch.arange(1, 6)[None]).logits.isfinite().all()


@pytest.mark.slow
def test_smoke_runs_every_section_within_its_cap(tmp_path):
    results = ROOT / "bench" / "results"
    before = {p: p.stat().st_mtime for p in results.iterdir()}
    proc = run("--smoke", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check-cpu-dry-run.json").read_text())
    assert report["dry_run"] and report["device"] == "cpu-dry-run" and report["device_name"] == "cpu"
    assert list(report["sections"]) == SECTIONS
    assert report["caps_sum_s"] <= report["budget_s"] - 30
    for name, section in report["sections"].items():
        assert section["status"] in ("ok", "partial"), (name, section)
        assert section["seconds"] <= section["cap_s"] + 10, (name, section["seconds"])   # stopped at its cap
        assert section.get("headline") or section.get("note"), name
    sections = report["sections"]
    assert sections["micro"]["engine"]["ok"]
    assert {r["cpu_experts"] for r in sections["parity"]["rows"]} == {"auto", "never", "always"}
    assert sections["chunk_size"]["recommended_chunk_bytes"] > 0
    assert sections["host_syncs"]["readbacks_per_layer"] == 1.0
    assert (tmp_path / "hardware-cpu-dry-run.yaml").is_file()
    assert report["checkpoint_build"]["ready"] and sections["full_size"]["built_here"]
    assert sections["host_wait"]["recommended_host_wait"] in ("spin", "block")
    planner = sections["planner"]
    assert planner["measured_tokens_per_s"] > 0 and planner["projected_tokens_per_s"] > 0
    assert planner["profile"].endswith("hardware-cpu-dry-run.yaml")
    assert sections["e2e"]["rows"]
    assert "cap s" in proc.stdout and "s capped" in proc.stdout                     # the table and the sums
    assert {p: p.stat().st_mtime for p in results.iterdir()} == before              # nothing under bench/results
