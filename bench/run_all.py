"""Rerun every CPU benchmark behind the README's results table and compare each number with the README.

    python bench/run_all.py                    # the README's own commands (the slow ones take tens of minutes)
    python bench/run_all.py --quick            # shorter settings for the slow ones (fewer repeats, prompts, tokens)
    python bench/run_all.py --only predictor,cache --full-size /work/data/mixtral-8x7b-l2

One table, BENCHES, says for each README row: the command, what --quick shortens, the JSON it writes
and how to read each number of the row from that JSON, with the noise the JSON records for it (the
spread of the repeats, the read-bandwidth drift over the run for timings without their own spread, or
the rounding the README prints for numbers that do not depend on timing). Rows that need a GPU or a
llama.cpp build, or a checkpoint that is not there, are skipped with a line saying so. Prints each
README number next to its new value, flagged ``MOVED`` when they differ by more than that noise, and
writes the JSONs (default bench/results; with --quick bench/results/quick) and run_all.json. Where
--quick measures a smaller recipe (fewer prompts or tokens: different numbers by design, not noise),
a number that differs is flagged ``smaller recipe`` instead (as in every --smoke row); rows where
--quick only repeats less keep ``MOVED``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, BenchRun, parse_bench_args, print_table  # noqa: E402
from llamacpp import ENV_VAR as LLAMA_ENV  # noqa: E402

Reader = Callable[[dict], float]


@dataclass(frozen=True)
class Number:
    """One number of a README row: its README value, how to read it from the JSON, how far it may move."""

    label: str
    readme: float
    value: Reader
    noise: Reader                     # absolute; see the module docstring


@dataclass(frozen=True)
class Bench:
    """One README row: a command (``{out}`` is the output folder), its --quick extras, its JSON and numbers."""

    name: str
    command: tuple[str, ...]
    json: str
    quick: tuple[str, ...] = ()
    numbers: tuple[Number, ...] = ()
    needs: tuple[str, ...] = ()       # "gpu", "llama.cpp", "full-size", or files ({full_size}...): skipped without
    smoke: tuple[str, ...] | None = None   # --smoke runs these rows with these arguments; None: not in smoke
    quick_repeats_only: bool = False  # --quick only repeats less; otherwise it measures a smaller recipe


def rounding(digits: int) -> Reader:
    """The README prints ``digits`` decimals of a number that does not depend on timing."""
    return lambda _: 0.5 * 10 ** -digits


def drift(value: Reader, floor: float = 0.2) -> Reader:
    """A timing without its own spread: the relative change of the machine's read bandwidth over the run, at
    least ``floor`` (single runs on a shared 2-core machine vary by about 20%)."""
    def noise(d: dict) -> float:
        m = d.get("machine", {})
        start, end = m.get("read_gbps_start"), m.get("read_gbps_end")
        moved = abs(start - end) / start if start and end else 0.0
        return abs(value(d)) * max(floor, moved)
    return noise


def find(rows: list[dict], **match) -> dict:
    """The one row whose fields equal ``match``."""
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if len(hits) != 1:
        raise KeyError(f"{len(hits)} rows match {match}")
    return hits[0]


# -- the README's rows ---------------------------------------------------------------------------------
def engine_overhead(label: str, slots: list[str], readme_us: float) -> Bench:
    def run(d: dict) -> dict:
        return d["runs"][label]
    return Bench(f"engine overhead ({label})",
                 ("bench/engine_overhead.py", "--label", label, *slots, "--repeats", "21", "--out", "{out}"),
                 "engine-overhead-cpu.json", quick=("--repeats", "5"), quick_repeats_only=True,
                 numbers=(Number(f"{label}: us per MoE layer call", readme_us,
                                 lambda d: run(d)["overhead_us_per_layer"],
                                 lambda d: run(d)["overhead_q3_us"] - run(d)["overhead_q1_us"]),))


def e2e_ratio(variant: str, phase: str, readme: float) -> Number:
    def ratio(d: dict) -> float:
        return find(d["results"], variant=variant)[f"{phase}_vs_transformers"]

    def noise(d: dict) -> float:
        base = find(d["results"], variant="transformers")[f"{phase}_spread"]
        return ratio(d) * (find(d["results"], variant=variant)[f"{phase}_spread"] + base)
    return Number(f"{variant} {phase} x plain", readme, ratio, noise)


def recall(model: str, predictor: str, readme: float, key: str = "recall") -> Number:
    def value(d: dict) -> float:
        return find(d["results"], predictor=predictor, distance=1)[key]
    return Number(f"{model} {predictor} {key}", readme, value, rounding(3))


def predictor_accuracy(model: str, values: dict[str, float], at_2k: dict[str, float], chance: float) -> Bench:
    numbers = [recall(model, p, v) for p, v in values.items()]
    numbers += [recall(model, p, v, "recall_at_2k") for p, v in at_2k.items()]
    numbers.append(Number(f"{model} random recall", chance, lambda d: d["random_recall"], rounding(3)))
    return Bench(f"predictor recall, {model}", ("bench/predictor_accuracy.py", "--model", model, "--out", "{out}"),
                 f"predictor-accuracy-{model}.json",
                 quick=("--fit-prompts", "24", "--heldout-prompts", "12", "--threads", "1"),
                 numbers=tuple(numbers))


def hit_rate(trace: str, policy: str, budget: int, readme: float) -> Number:
    def value(d: dict) -> float:
        rows = d["traces"][trace]["results"]
        return 100 * find(rows, policy=policy, allocation="global", budget_percent=budget)["hit_rate"]
    return Number(f"{trace} {policy} {budget}%", readme, value, rounding(1))


def cache_policies() -> Bench:
    readme = {"tiny-mixtral": {"score": (33.7, 78.9), "lru": (26.3, 75.8), "belady": (53.5, 87.6),
                               "score+prefetch": (79.3, 93.3), "lru+prefetch": (69.4, 91.4)},
              "tiny-deepseek": {"score": (63.6, 80.6), "lru": (61.6, 77.1), "belady": (74.3, 88.1),
                                "score+prefetch": (80.1, 93.5), "lru+prefetch": (76.5, 92.1)},
              "synthetic-4096": {"score": (68.5, 83.5), "lru": (66.5, 82.6), "belady": (83.1, 93.0)}}
    numbers = [hit_rate(trace, policy, budget, value) for trace, policies in readme.items()
               for policy, pair in policies.items() for budget, value in zip((25, 50), pair)]
    return Bench("cache hit rate", ("bench/cache_policies.py", "--out", "{out}"), "cache_policies.json",
                 quick=("--prompts", "6", "--new-tokens", "32"), numbers=tuple(numbers))


def sweep_row(policy: str, budget: str, predictor: str, key: str, readme: float, digits: int,
              host_memory: str = "all", scale: float = 1.0) -> Number:
    def value(d: dict) -> float:
        row = find(d["results"], policy=policy, budget=budget, predictor=predictor, host_memory=host_memory)
        return scale * row[key]
    label = f"{policy} {budget}{'' if host_memory == 'all' else ' host ' + host_memory} {predictor} {key}"
    return Number(label, readme, value, lambda d: 0.5 * 10 ** -digits)


def sweep_tiny_mixtral() -> Bench:
    budgets = ("10%", "25%", "50%", "75%", "100%")
    hits = {"learned": (36.0, 68.7, 90.3, 96.7, 99.4), "none": (22.4, 51.2, 86.1, 94.8, 99.3)}
    speed = {"learned": (8.6, 9.6, 10.2, 10.3, 10.3), "none": (7.9, 9.0, 10.1, 10.3, 10.3)}
    numbers = [sweep_row("score", b, p, "hit_rate", v, 1, scale=100) for p, vs in hits.items()
               for b, v in zip(budgets, vs)]
    numbers += [sweep_row("score", b, p, "tokens_per_s", v, 1, scale=1e-3) for p, vs in speed.items()
                for b, v in zip(budgets, vs)]
    return Bench("memory-budget sweep, tiny-mixtral (k tokens/s, hit %)",
                 ("-m", "moe_offload", "sweep", "--model", "tiny-mixtral", "--simulate", "--hardware", "rtx4090-pcie4",
                  "--predictor", "none,learned", "--budgets", "10%,25%,50%,75%,100%", "--policies",
                  "lru,score,arc,belady", "--prompts", "8", "--new-tokens", "64",
                  "--out", "{out}/sweep-tiny-mixtral-rtx4090"),
                 "sweep-tiny-mixtral-rtx4090/sweep.json", quick=("--prompts", "2", "--new-tokens", "32"),
                 numbers=tuple(numbers))


def prefetch_speedup(shape: str, hardware: str, budget: str, readme: float) -> Number:
    def value(d: dict) -> float:
        return find(d["speedups"], shape=shape, hardware=hardware, budget=budget, predictor="oracle")["speedup"]
    return Number(f"{shape} {hardware} {budget} oracle x none", readme, value, rounding(2))


def prefetch_budget() -> Bench:
    readme = {("mixtral-8x7b", "rtx4090-pcie4"): (1.37, 1.35, 1.31, 1.19),
              ("mixtral-8x7b", "h100-pcie5"): (1.17, 1.13, 1.12, 1.05),
              ("deepseek-v2-lite", "rtx4090-pcie4"): (1.09, 1.08, 1.10, 1.10),
              ("qwen3-30b-a3b", "rtx4090-pcie4"): (1.05, 1.07, 1.07, 1.06)}
    numbers = [prefetch_speedup(shape, hw, b, v) for (shape, hw), vs in readme.items()
               for b, v in zip(("10%", "25%", "50%", "75%"), vs)]
    return Bench("prefetch that pays for itself", ("bench/prefetch_budget.py", "--tokens", "200", "--out", "{out}"),
                 "prefetch_budget.json", quick=("--tokens", "60"), numbers=tuple(numbers))


def kernel_ms(dtype: str, readme: float) -> Number:
    def value(d: dict) -> float:
        return find(d["results"], dtype=dtype, tokens=1)["numba_ms"]
    return Number(f"{dtype} T=1 numba ms", readme, value, drift(value))


def serve_tokens(budget: str, clients: int, readme: float) -> Number:
    def value(d: dict) -> float:
        levels = next(b["levels"] for b in d["budgets"] if b["budget"] == budget)
        return find(levels, clients=clients, system="serve")["tokens_per_s"]
    return Number(f"{budget} slots, {clients} clients: serve tokens/s", readme, value, drift(value))


def quantized(model: str, fmt: str, readme: float) -> Number:
    def value(d: dict) -> float:
        return find(d["accuracy"], model=model, format=fmt)["loss_change_pct"]
    return Number(f"{model} {fmt} held-out loss change %", readme, value, rounding(2))


def projection(fmt: str, readme: float) -> Number:
    def value(d: dict) -> float:
        return find(d["projection"], format=fmt)["speedup"]
    return Number(f"Mixtral-8x7B 24 GB {fmt} x bf16 decode", readme, value, rounding(1))


def quantized_experts() -> Bench:
    loss = {"int8": (0.00, 0.00), "int4": (-0.04, 0.06), "int4-g128": (0.04, -0.06), "fp8": (0.02, -0.02)}
    numbers = [quantized(m, f, v) for f, pair in loss.items() for m, v in zip(("tiny-mixtral", "tiny-deepseek"), pair)]
    numbers += [projection(f, v) for f, v in (("int8", 2.9), ("int4", 12.4), ("int4-g128", 15.6))]
    return Bench("quantized experts", ("bench/quantized_experts.py", "--out", "{out}"), "quantized_experts.json",
                 quick=("--tokens", "256"), numbers=tuple(numbers))


def disk_sweep(predictor: str, host: str, readme: float) -> Number:
    return sweep_row("score", "80GiB", predictor, "tokens_per_s", readme, 3, host_memory=host)


def scheduler(phase: str, key: str, readme: float, digits: int) -> Number:
    def value(d: dict) -> float:
        return max(r[key] for r in d["results"] if r["phase"] == phase)
    return Number(f"{phase}: worst {key.removesuffix('_worst')} / optimum", readme, value, rounding(digits))


def llamacpp_ratio(pair: str, phase: str, readme: float) -> Number:
    def value(d: dict) -> float:
        return find(d["results"], ours=pair)[f"{phase}_ratio"]
    return Number(f"{pair} {phase} ours / llama.cpp", readme, value, drift(value))


def quantize_ratio(fmt: str, readme: float) -> Number:
    def value(d: dict) -> float:
        return find(d["quantize_once"], format=fmt)["ratio_vs_llama"]
    return Number(f"{fmt} quantize time / llama-quantize", readme, value, drift(value))


def gguf_first_load(readme: float) -> Number:
    def value(d: dict) -> float:
        return d["rows"][1]["seconds"] / d["rows"][0]["seconds"]
    return Number("bf16 -> int4 first load / GGUF load", readme, value, drift(value))


BENCHES = (
    Bench("GPU check", ("bench/gpu_check.py",), "gpu-check.json", needs=("gpu",)),
    engine_overhead("after, all resident", [], 65),
    engine_overhead("after, 12 slots", ["--expert-slots", "12"], 156),
    Bench("end to end, CPU", ("bench/e2e.py", "--model", "tiny-mixtral", "--repeats", "7", "--out", "{out}"),
          "e2e-cpu.json", quick=("--repeats", "3"), quick_repeats_only=True,
          numbers=(e2e_ratio("offload-100%", "prefill", 0.87), e2e_ratio("offload-100%", "decode", 0.86),
                   e2e_ratio("offload-25%", "prefill", 0.77), e2e_ratio("offload-25%", "decode", 0.77))),
    predictor_accuracy("tiny-mixtral", {"learned": 0.882, "cross_layer": 0.774, "previous": 0.352,
                                        "popularity": 0.286, "eam": 0.355},
                       {"learned": 0.985, "cross_layer": 0.935}, 0.25),
    predictor_accuracy("tiny-deepseek", {"learned": 0.833, "cross_layer": 0.737, "previous": 0.216,
                                         "popularity": 0.180, "eam": 0.233},
                       {"learned": 0.958, "cross_layer": 0.911}, 0.125),
    cache_policies(),
    sweep_tiny_mixtral(),
    prefetch_budget(),
    Bench("CPU expert kernels", ("bench/cpu_kernels.py", "--out", "{out}"), "cpu_kernels.json",
          quick=("--repeats", "5", "--budget", "0.4", "--pick-budget", "0.5"), quick_repeats_only=True,
          numbers=tuple(kernel_ms(d, v) for d, v in (("bf16", 0.71), ("int8", 0.40), ("int8-a8", 0.38),
                                                     ("int4", 0.34), ("int4-a8", 0.26), ("int4-g128-a8", 0.26),
                                                     ("fp8", 0.73)))),
    Bench("serve under load", ("bench/serve_load.py", "--requests", "4", "--max-tokens", "32", "--out", "{out}"),
          "serve_load.json", quick=("--requests", "1"),
          numbers=tuple(serve_tokens(b, c, v) for b, vs in (("25%", (106, 163, 409)), ("100%", (116, 195, 502)))
                        for c, v in zip((1, 4, 16), vs))),
    quantized_experts(),
    Bench("the disk tier", ("bench/disk_tier.py", "--model", "{full_size}", "--host-memory", "3GiB", "--out", "{out}"),
          "disk_tier.json", quick=("--rounds", "2"), quick_repeats_only=True, needs=("full-size",)),
    Bench("disk-tier projection, DeepSeek-V3 (tokens/s)",
          ("-m", "moe_offload", "sweep", "--model", "deepseek-v3", "--simulate", "--hardware", "h100-pcie5",
           "--budgets", "80GiB", "--host-memory", "64GiB,128GiB,256GiB", "--policies", "score", "--predictor",
           "none,oracle@0.8,oracle", "--prefetch-depth", "2", "--synthetic-tokens", "96",
           "--out", "{out}/sweep-deepseek-v3-disk"),
          "sweep-deepseek-v3-disk/sweep.json", quick=("--synthetic-tokens", "32"),
          numbers=tuple(disk_sweep(p, h, v) for p, vs in (("none", (1.335, 1.435, 1.819)),
                                                          ("oracle@0.8", (1.761, 1.957, 2.504)),
                                                          ("oracle", (1.910, 2.148, 2.768)))
                        for h, v in zip(("64GiB", "128GiB", "256GiB"), vs))),
    Bench("moe-offload vs llama.cpp, CPU",
          ("bench/vs_llamacpp.py", "--llama-cpp", "{llama_cpp}", "--model", "{full_size}", "--formats", "bf16",
           "int8-a8", "int4-a8", "--repeats", "2", "--new-tokens", "16", "--out", "{out}"),
          "vs_llamacpp.json", quick=("--repeats", "1"), quick_repeats_only=True, needs=("llama.cpp", "full-size"),
          numbers=tuple(llamacpp_ratio(pair, phase, v) for phase, vs in (("decode", (0.73, 0.86, 0.62)),
                                                                          ("prefill", (0.56, 0.80, 0.51)))
                        for pair, v in zip(("bf16", "int8-a8", "int4-a8"), vs))),
    Bench("quantize-once vs llama-quantize",
          ("bench/quantize_speed.py", "--checkpoint", "{full_size}", "--llama-cpp", "{llama_cpp}",
           "--gguf", "{full_size}.gguf/BF16.gguf", "--no-fit", "--out", "{out}"),
          "quantize_speed.json", quick_repeats_only=True,
          needs=("llama.cpp", "full-size", "{full_size}.gguf/BF16.gguf"),
          numbers=(quantize_ratio("int8", 0.28), quantize_ratio("int4", 1.11))),
    Bench("GGUF load vs quantizing bf16 safetensors",
          ("bench/gguf_load.py", "--gguf", "{full_size}.gguf/Q4_K_M.gguf", "--safetensors", "{full_size}",
           "--out", "{out}"),
          "gguf_load.json", quick_repeats_only=True, needs=("full-size", "{full_size}.gguf/Q4_K_M.gguf"),
          numbers=(gguf_first_load(3.7),)),
    Bench("scheduler vs exact optimum", ("bench/scheduler_quality.py", "--out", "{out}"), "scheduler_quality.json",
          quick=("--layers", "150"), smoke=("--smoke",),
          numbers=(scheduler("decode", "greedy_worst", 1.17, 2), scheduler("decode", "ours_worst", 1.0, 3),
                   scheduler("prefill", "ours_worst", 1.005, 3))),
    Bench("routing of the shipped models", ("bench/routing_stats.py", "--model", "tiny-mixtral", "--out", "{out}"),
          "routing-tiny-mixtral.json", quick=("--max-tokens", "4096")),
)


COLUMNS = [("bench", "row", ""), ("number", "number", ""), ("readme", "README", "g"), ("new", "new", ".4g"),
           ("noise", "+-", ".2g"), ("flag", "", "")]


# -- running ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    bench: Bench
    status: str                               # ran, failed, skipped
    seconds: float = 0.0
    note: str = ""
    values: list[dict] = field(default_factory=list)


def skip_reason(bench: Bench, args: argparse.Namespace) -> str | None:
    for need in bench.needs:
        if need == "gpu":
            return "needs a CUDA GPU"
        if need == "llama.cpp" and not (args.llama_cpp and Path(args.llama_cpp).is_dir()):
            return (f"needs a llama.cpp build: --llama-cpp DIR or ${LLAMA_ENV} (`python bench/llamacpp.py --help` "
                    "says how to build one)")
        if need == "full-size" and not (args.full_size and Path(args.full_size, "config.json").is_file()):
            return ("needs a full-size checkpoint: python bench/full_size.py --preset mixtral-8x7b --layers 2 "
                    "--out DIR, then --full-size DIR")
        if "{" in need and not Path(need.format(full_size=args.full_size)).is_file():
            return f"needs {need.format(full_size=args.full_size)} (bench/vs_llamacpp.py writes the GGUF files)"
    if args.smoke and bench.smoke is None:
        return "no smoke settings (it needs a checkpoint or tool the smoke run does not make)"
    return None


def command(bench: Bench, args: argparse.Namespace, out: Path) -> list[str]:
    extra = (bench.smoke or ()) if args.smoke else bench.quick if args.quick else ()
    parts = [p.format(out=out, full_size=args.full_size, llama_cpp=args.llama_cpp) for p in bench.command]
    return [sys.executable, *parts, *extra]


def run_bench(bench: Bench, args: argparse.Namespace, out: Path) -> Outcome:
    reason = skip_reason(bench, args)
    if reason:
        print(f"[run_all] skipped {bench.name}: {reason}", flush=True)
        return Outcome(bench, "skipped", note=reason)
    cmd = command(bench, args, out)
    print(f"[run_all] {bench.name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL if args.quiet else None)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return Outcome(bench, "failed", seconds, f"exit {proc.returncode}")
    smaller = args.smoke or (args.quick and not bench.quick_repeats_only)
    values = compare(bench, out / bench.json, smaller_recipe=smaller)
    if values:                          # as each row finishes, so a long run shows what it has
        print_table(values, COLUMNS)
    return Outcome(bench, "ran", seconds, values=values)


def compare(bench: Bench, path: Path, smaller_recipe: bool = False) -> list[dict]:
    """Each number: README value, new value, noise, and whether it moved by more than the noise (``smaller recipe``
    instead of ``MOVED`` when the run measured a smaller recipe than the README's)."""
    data = json.loads(path.read_text())
    rows = []
    for number in bench.numbers:
        try:
            new, noise = number.value(data), number.noise(data)
        except (KeyError, StopIteration, TypeError) as err:
            rows.append({"bench": bench.name, "number": number.label, "readme": number.readme, "new": None,
                         "noise": None, "flag": f"not in the JSON ({err})"})
            continue
        moved = abs(new - number.readme) > noise + 1e-12
        rows.append({"bench": bench.name, "number": number.label, "readme": number.readme, "new": new,
                     "noise": noise, "flag": ("smaller recipe" if smaller_recipe else "MOVED") if moved else ""})
    return rows


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    out = run.out
    only = set(args.only.split(",")) if args.only else None
    chosen = [b for b in BENCHES if (only is None or any(o in b.name for o in only))
              and (not args.smoke or b.smoke is not None or b.needs)]
    outcomes = [run_bench(b, args, out) for b in chosen]
    values = [v for o in outcomes for v in o.values]
    settings = "quick settings" if args.quick else "smoke" if args.smoke else "the README commands"
    print(f"\nREADME numbers vs this run ({settings}; MOVED: further apart than the noise its JSON records; "
          "smaller recipe: this run measured fewer prompts, tokens or layers than the README's command, "
          "so it differs by design)")
    if values:
        print_table(values, COLUMNS)
    for o in outcomes:
        print(f"  {o.status:>7}  {o.bench.name}  {o.seconds:.0f} s  {o.note}")
    written = run.write_json("run_all.json", {
        "quick": args.quick, "out": str(out), "numbers": values,
        "benches": [{"name": o.bench.name, "status": o.status, "seconds": o.seconds, "note": o.note,
                     "command": " ".join(command(o.bench, args, out)[1:])} for o in outcomes]})
    print(f"wrote {written}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter settings for the slow benchmarks")
    p.add_argument("--only", help="comma list: run the rows whose name contains one of these")
    p.add_argument("--full-size", help="a 2-layer Mixtral-8x7B checkpoint from bench/full_size.py (the disk tier row)")
    p.add_argument("--llama-cpp", default=os.environ.get(LLAMA_ENV),
                   help=f"llama.cpp build folder for the rows that compare with it (default ${LLAMA_ENV})")
    p.add_argument("--quiet", action="store_true", help="hide the benchmarks' own output")
    args = parse_bench_args(p, argv, {"quiet": True})
    if args.quick and not args.out:
        args.out = str(RESULTS / "quick")      # quick numbers never replace the README's own JSONs
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
