"""Every script in bench/ runs, in smoke mode, in CI.

The convention: a bench script parses its flags with ``bench/common.py``'s ``parse_bench_args``, which adds
``--smoke`` (the bench's tiny settings: every code path in seconds on the CPU) and ``--out DIR`` (where the
JSON/PNG go; in smoke mode never under bench/results/), and writes through ``BenchRun.write_json`` (the same
machine record in every JSON). To register a new bench, add ONE entry to ``SMOKE`` below: the script's file
name -> ``Smoke(args, writes)``, the arguments after the script (``{out}`` is the test's scratch folder) and
a glob of what it must write there (default: a JSON). A module of bench/ that is imported, not run, goes in
``LIBRARIES``. ``test_every_bench_has_a_smoke_entry`` fails for a script in neither.

Deselect locally with ``pytest -m "not bench_smoke"``; CI (`.ci/run`, plain ``pytest -q``) runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
RESULTS = BENCH / "results"


@dataclass(frozen=True)
class Smoke:
    args: str = "--smoke --out {out}"
    writes: str = "*.json"          # glob under {out} that must match a file after the run
    timeout_s: float = 600.0


SMOKE: dict[str, Smoke] = {
    "batch_throughput.py": Smoke(writes="batch_throughput.json"),
    "cache_policies.py": Smoke(writes="cache_policies.json"),
    "cpu_kernels.py": Smoke(writes="cpu_kernels.json"),
    "disk_tier.py": Smoke(writes="disk_tier.json"),
    "e2e.py": Smoke(writes="e2e-cpu.json"),
    "e2e_gpu.py": Smoke(writes="e2e-cpu.json"),
    "engine_overhead.py": Smoke(writes="engine-overhead-cpu.json"),
    "full_size.py": Smoke("--preset mixtral-8x7b --smoke --out {out}", writes="model.safetensors.index.json"),
    "gguf_load.py": Smoke(writes="gguf_load.json"),
    # gpu_check.py's --dry-run (alias --smoke) runs every section on the CPU, each inside its cap
    "gpu_check.py": Smoke("--dry-run --out {out}", writes="gpu-check-*.json"),
    "int8_accuracy.py": Smoke(writes="int8_accuracy.json"),
    "offline_projection.py": Smoke(writes="offline_projection.json"),
    "predictor_accuracy.py": Smoke(writes="predictor-accuracy-tiny-mixtral.json"),
    "prefetch_budget.py": Smoke(writes="prefetch_budget.json"),
    "quantize_speed.py": Smoke(writes="quantize_speed.json"),
    "quantized_experts.py": Smoke(writes="quantized_experts.json"),
    "runtime_defaults.py": Smoke(writes="runtime-defaults.yaml"),
    "routing_stats.py": Smoke("--model tiny-mixtral --smoke --out {out}", writes="routing-tiny-mixtral.json"),
    "run_all.py": Smoke(writes="run_all.json"),
    "scheduler_quality.py": Smoke(writes="scheduler_quality.json"),
    "serve_load.py": Smoke(writes="serve_load.json"),
    "simulator_speed.py": Smoke(writes="simulator_speed.json"),
    "train_tiny_moe.py": Smoke("--arch deepseek --smoke --out {out}", writes="training.json"),
    "transfer_bw.py": Smoke(writes="transfer-cpu.json"),
    # without a llama.cpp build (CI) the smoke run measures its own half and says so
    "vs_llamacpp.py": Smoke(writes="vs_llamacpp.json"),
}

# Modules of bench/ that scripts import; they are not run on their own.
LIBRARIES = {"common.py", "routing_replay.py", "llamacpp.py"}


def bench_env(tmp_path: Path) -> dict:
    """The test's environment, with this interpreter's bin first on PATH (benches that start `moe-offload` or
    `python` get this install) and the user caches redirected into ``tmp_path``."""
    env = dict(os.environ, MPLBACKEND="Agg", XDG_CACHE_HOME=str(tmp_path / "cache"))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def written_to_results(pattern: str, since: float) -> list[Path]:
    """Files named like a smoke run's output under bench/results/ that changed since ``since``."""
    return [p for p in RESULTS.rglob(pattern) if p.is_file() and p.stat().st_mtime >= since]


@pytest.mark.bench_smoke
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_bench_smoke(script: str, tmp_path: Path) -> None:
    smoke = SMOKE[script]
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, str(BENCH / script), *smoke.args.format(out=out).split()]
    started = time.time()
    proc = subprocess.run(cmd, cwd=BENCH.parent, env=bench_env(tmp_path), capture_output=True, text=True,
                          timeout=smoke.timeout_s)
    tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}"
    assert list(out.glob(smoke.writes)), f"{script} --smoke wrote no {smoke.writes} into {out}:\n{tail}"
    wrote = written_to_results(smoke.writes, started)
    assert not wrote, f"{script} in smoke mode wrote under bench/results: {wrote}"


def test_every_bench_has_a_smoke_entry() -> None:
    scripts = {p.name for p in BENCH.glob("*.py")}
    missing = sorted(scripts - set(SMOKE) - LIBRARIES)
    assert not missing, (f"bench scripts without a smoke entry: {missing}; add each to SMOKE in {__file__} "
                         "(or to LIBRARIES if it is imported, not run)")
    stale = sorted((set(SMOKE) | LIBRARIES) - scripts)
    assert not stale, f"SMOKE/LIBRARIES name files that are not in bench/: {stale}"


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(BENCH))
    try:
        import common
    finally:
        sys.path.remove(str(BENCH))
    return common


def test_smoke_settings_replace_defaults_and_given_flags_win(common) -> None:
    import argparse

    def parse(*argv: str):
        p = argparse.ArgumentParser()
        p.add_argument("--tokens", type=int, default=64)
        return common.parse_bench_args(p, list(argv), {"tokens": 2})

    assert parse().tokens == 64 and not parse().smoke
    assert parse("--smoke").tokens == 2
    assert parse("--smoke", "--tokens", "5").tokens == 5
    with pytest.raises(SystemExit):
        parse("--smoke", "--out", str(RESULTS / "smoke"))       # smoke output never lands in bench/results


def test_bench_run_writes_the_machine_record_where_out_says(common, tmp_path: Path) -> None:
    import argparse
    import json

    run = common.BenchRun.start(argparse.Namespace(smoke=True, out=str(tmp_path / "a")))
    assert run.path("x.png") == tmp_path / "a" / "x.png"
    record = json.loads(run.write_json("x.json", {"value": 1}).read_text())
    assert record["value"] == 1 and record["smoke"] is True
    machine = record["machine"]
    for key in ("cpu_model", "cpu_flags", "cpu_count", "torch", "numba", "read_gbps_start", "read_gbps_end",
                "git_commit"):
        assert key in machine, key
    assert machine["read_gbps_start"] > 0 and machine["read_gbps_end"] > 0
    named = common.BenchRun.start(argparse.Namespace(smoke=True, out=str(tmp_path / "b" / "r.json")))
    assert named.path("other.json") == tmp_path / "b" / "r.json" and named.path("p.png") == tmp_path / "b" / "r.png"
