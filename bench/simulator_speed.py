"""Wall time of a simulated sweep, this checkout against another one, and whether they project the same numbers.

    python bench/simulator_speed.py --baseline-python /path/to/old/venv/bin/python
    python bench/simulator_speed.py --tokens 256 --repeats 3 --baseline-python OLD   # a shorter trace
    python bench/simulator_speed.py --smoke --out /tmp/x

Runs ``moe-offload sweep --model mixtral-8x7b --simulate --synthetic --hardware rtx4090-pcie4 --budgets 25%
--policies score --predictor oracle --prefetch-depth 8`` (``--synthetic-tokens`` from ``--tokens``; 4096 is the
CLI's default) as a subprocess with this Python and, given ``--baseline-python`` (an interpreter that imports
another version of moe-offload: a wheel of the old commit installed in a virtual environment, since an
editable install maps the ``cache``, ``predictor`` and ``cpu_kernels`` packages to its own checkout), with
that one, alternating, ``--repeats`` times each. Reports the median wall time of each, the ratio, and each
run's projected tokens/s, hit rate and bytes per token, which must agree to 4 significant digits. Writes simulator_speed.json under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import BenchRun, median, parse_bench_args, print_table  # noqa: E402

SWEEP = ["sweep", "--model", "mixtral-8x7b", "--simulate", "--synthetic", "--hardware", "rtx4090-pcie4",
         "--budgets", "25%", "--policies", "score", "--predictor", "oracle", "--prefetch-depth", "8"]
COMPARED = ("tokens_per_s", "hit_rate", "bytes_copied_per_token")


def run_sweep(python: str, tokens: int) -> tuple[float, dict]:
    """(wall seconds, the result row) of one sweep run by ``python``."""
    with tempfile.TemporaryDirectory() as out:
        command = [python, "-m", "moe_offload", *SWEEP, "--synthetic-tokens", str(tokens), "--out", out]
        start = time.perf_counter()
        # run from the output folder: from a checkout's root, ``-m moe_offload`` would import that checkout's
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=out)
        seconds = time.perf_counter() - start
        row = json.loads((Path(out) / "sweep.json").read_text())["results"][0]
    return seconds, {key: row[key] for key in COMPARED}


def checkout_of(python: str) -> dict:
    """Where ``python`` imports moe-offload's two halves of the simulator from (``moe_offload`` and its
    ``cache`` package, which an editable install maps to a folder of its own checkout, whatever PYTHONPATH
    says), and the git commit of each folder (None for an installed copy: compare with a wheel of the old
    commit installed in a virtual environment)."""
    code = ("import pathlib, moe_offload, moe_offload.cache as c; "
            "print(pathlib.Path(moe_offload.__file__).resolve().parent); print(pathlib.Path(c.__file__).resolve().parent)")
    with tempfile.TemporaryDirectory() as cwd:      # not from a checkout's root (see run_sweep)
        folders = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True,
                                 cwd=cwd).stdout.split()

    def commit(folder: str) -> str | None:
        found = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True)
        return found.stdout.strip() if found.returncode == 0 else None
    return {"python": python, "moe_offload": folders[0], "cache": folders[1],
            "git_commits": sorted({str(commit(f)) for f in folders})}


def same_to_4_digits(a: float, b: float) -> bool:
    return f"{a:.4g}" == f"{b:.4g}"


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    tokens, repeats = args.tokens, args.repeats
    pythons = {"this": sys.executable} | ({"baseline": args.baseline_python} if args.baseline_python else {})
    times: dict[str, list[float]] = {name: [] for name in pythons}
    rows: dict[str, dict] = {}
    for _ in range(repeats):
        for name, python in pythons.items():   # alternating, so drift on a shared machine hits both
            seconds, row = run_sweep(python, tokens)
            times[name].append(seconds)
            rows[name] = row
    table = [{"checkout": name, "seconds": median(times[name]), "calls_per_s": tokens * 32 / median(times[name]),
              **rows[name]} for name in pythons]
    print_table(table, [("checkout", "checkout", "s"), ("seconds", "wall s (median)", ".2f"),
                        ("calls_per_s", "MoE calls/s", ".0f"), ("tokens_per_s", "tokens/s", ".6g"),
                        ("hit_rate", "hit rate", ".4f"), ("bytes_copied_per_token", "B/token", ".6g")])
    payload = {"sweep": "moe-offload " + " ".join(SWEEP) + f" --synthetic-tokens {tokens}", "tokens": tokens,
               "repeats": repeats, "runs": table, "seconds": times,
               "checkouts": {name: checkout_of(python) for name, python in pythons.items()}}
    if "baseline" in rows:
        payload["speedup"] = median(times["baseline"]) / median(times["this"])
        payload["same_to_4_digits"] = all(same_to_4_digits(rows["this"][k], rows["baseline"][k]) for k in COMPARED)
        print(f"speed-up {payload['speedup']:.2f}x, same numbers to 4 significant digits: "
              f"{payload['same_to_4_digits']}")
    print(f"wrote {run.write_json('simulator_speed.json', payload)}")
    return 0 if payload.get("same_to_4_digits", True) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="synthetic trace tokens (default 4096, the CLI's)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline-python", help="a Python that imports the checkout to compare with")
    sys.exit(main(parse_bench_args(parser, None, {"tokens": 16, "repeats": 1})))   # --smoke: seconds
