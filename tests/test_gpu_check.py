"""bench/gpu_check.py: --help, and the dry run on CPU writes a JSON with every section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
SECTIONS = ["environment", "micro", "cuda_tests", "parity", "host_syncs", "chunk_size", "full_size", "e2e"]


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_help_names_every_section():
    proc = run("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in SECTIONS + ["--dry-run", "--budget-s"]:
        assert name in proc.stdout


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = run("--dry-run", "--budget-s", "90", "--out", str(out), timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["status"] in ("ok", "partial", "skipped"), (name, section)
        assert "seconds" in section
    sections = report["sections"]
    assert sections["micro"]["engine"]["ok"], sections["micro"]
    assert all(section["status"] == "ok" for name, section in sections.items() if name in ("environment", "micro"))
    assert sections["parity"]["status"] in ("ok", "partial") and sections["parity"]["rows"]
    assert {r["cpu_experts"] for r in sections["parity"]["rows"]} == {"auto", "never", "always"}
    assert sections["chunk_size"]["recommended_chunk_bytes"] > 0
    assert sections["host_syncs"]["readbacks_per_layer"] == 1.0, sections["host_syncs"]
    assert "section" in proc.stdout and "headline" in proc.stdout   # the printed table
