"""Shared benchmark plumbing: the --smoke/--out flags, where results go, the machine record, medians, tables.

Every bench parses its flags with ``parse_bench_args`` (adds ``--smoke`` and ``--out DIR``; with
``--smoke`` the bench's tiny settings replace its defaults), starts a ``BenchRun`` before measuring
(it measures the machine's read bandwidth then) and writes through ``BenchRun.write_json``, which adds
the same machine record to every JSON: CPU model and flags, cores, library versions, read bandwidth at
the start and at the end of the run, load average, git commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
REPO = BENCH.parent
SIMD_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "neon")
BANDWIDTH_BYTES = 256 * 2**20          # read per bandwidth pass (16 MiB in smoke mode)


def parse_bench_args(p: argparse.ArgumentParser, argv: list[str] | None, smoke: dict,
                     out_flag: bool = True) -> argparse.Namespace:
    """Parse ``argv`` after adding ``--smoke`` (and ``--out DIR`` unless the bench has its own). With
    ``--smoke`` the ``smoke`` settings replace the defaults; flags given on the command line still win."""
    p.add_argument("--smoke", action="store_true",
                   help="tiny settings that run every code path in seconds on the CPU (nothing under bench/results)")
    if out_flag:
        p.add_argument("--out", help="folder for the JSON/PNG (default bench/results; with --smoke a temporary one); "
                                     "a path ending in .json names the JSON itself")
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**smoke)
        args = p.parse_args(argv)
        if args.out and _inside(Path(args.out), RESULTS):
            p.error(f"--smoke writes nothing under {RESULTS}; give --out a scratch folder")
    return args


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


@dataclass(frozen=True)
class BenchRun:
    """One run of a bench: where its files go, the command, and the machine as it was at the start."""

    out: Path                   # folder of the JSON/PNG
    json_file: Path | None      # --out x.json: the JSON's own path (its PNG beside it)
    smoke: bool
    command: str
    started: float              # time.time()
    read_gbps_start: float
    load_avg_start: tuple

    @classmethod
    def start(cls, args: argparse.Namespace) -> BenchRun:
        """Resolve the output folder and measure the read bandwidth before the bench runs."""
        smoke = bool(getattr(args, "smoke", False))
        given = getattr(args, "out", None)
        json_file = Path(given) if given and str(given).endswith(".json") else None
        if json_file is not None:
            out = json_file.parent
        elif given:
            out = Path(given)
        else:
            out = Path(tempfile.mkdtemp(prefix="moe-offload-smoke-")) if smoke else RESULTS
        return cls(out, json_file, smoke, command_line(), time.time(), read_gbps(smoke), os.getloadavg())

    def path(self, name: str) -> Path:
        """Where the file ``name`` (e.g. 'e2e-cpu.json', 'e2e-cpu.png') goes."""
        if self.json_file is not None:
            return self.json_file.with_suffix(Path(name).suffix)
        return self.out / name

    def machine(self) -> dict:
        """The machine record, the read bandwidth measured again now (at the end)."""
        return machine() | {"read_gbps_start": round(self.read_gbps_start, 2),
                            "read_gbps_end": round(read_gbps(self.smoke), 2),
                            "load_avg_start": self.load_avg_start, "load_avg_end": os.getloadavg(),
                            "seconds": round(time.time() - self.started, 1)}

    def write_json(self, name: str, payload: dict, machine: dict | None = None) -> Path:
        """``payload`` with the machine (``self.machine()``, or the bench's own extension of it), the command
        and the smoke flag, as JSON at ``self.path(name)``."""
        path = self.path(name)
        record = {"command": self.command, "smoke": self.smoke, **payload, "machine": machine or self.machine()}
        return write_json(path, record)


def command_line() -> str:
    """The command as typed, with the script path relative to the repository."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def device_name(device: str) -> str:
    """'cpu' or the GPU's name, e.g. 'nvidia-h100-80gb-hbm3', for file names."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def machine() -> dict:
    """CPU model and flags, cores, library versions, GPU and git commit: the same record in every JSON."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "numba": numba.__version__, "numpy": np.__version__, "transformers": _version("transformers"),
            "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "cpu_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
            "processor": platform.processor() or platform.machine()}
    info |= cpu_info()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info | git_commit()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cpu_info() -> dict:
    """CPU model name and the SIMD flags that decide kernel speed (from /proc/cpuinfo where it exists)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name", ""), "cpu_flags": [f for f in SIMD_FLAGS if f in flags]}


def git_commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


@numba.njit(parallel=True, nogil=True, fastmath=True, cache=True)
def parallel_sum(values):
    """Sum of a float32 array (a streaming read at full parallel bandwidth)."""
    total = np.float32(0.0)
    for i in numba.prange(values.size):
        total += values[i]
    return total


def read_gbps(smoke: bool = False) -> float:
    """Memory read bandwidth now: best of three passes of a parallel reduction over a float32 array."""
    data = np.ones((BANDWIDTH_BYTES >> 4 if smoke else BANDWIDTH_BYTES) // 4, dtype=np.float32)
    parallel_sum(data[:1024])                      # compile (or load the cached kernel) outside the timing
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        parallel_sum(data)
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[format(r[k], f) if isinstance(r.get(k), (int, float)) else str(r.get(k, "-")) for k, _, f in columns]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def close_offloaded(model) -> None:
    """model.offload.close() where the runtime has it: waits for copies, unhooks, stops the CPU runner, unpins."""
    close = getattr(getattr(model, "offload", None), "close", None)
    if close is not None:
        close()
