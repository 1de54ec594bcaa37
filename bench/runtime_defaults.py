"""Search the prefetch predictor and depth `run` uses by default on CUDA; write the shipped YAML it reads.

    python bench/runtime_defaults.py              # writes configs/runtime-defaults.yaml and results/runtime_defaults.json
    python bench/runtime_defaults.py --check      # searches again from the file's own recipe; fails if the pick differs
    python bench/runtime_defaults.py --smoke --out /tmp/x

Traces the shipped models (tiny-mixtral, tiny-deepseek) on a few held-out prompts with gate inputs, replays
each through the simulator for every runtime predictor and depth (moe_offload/simulate/defaults.py: the score
cache at a quarter of the experts, costed as full-size experts of each family on the RTX 4090 and H100
profiles) and picks the best geometric mean over no prefetch. Prints the table; writes the pick, the table and
the recipe (the prompts verbatim) to configs/runtime-defaults.yaml, so the search can be run again exactly.
With --smoke: one prompt, 4 tokens, two depths; the YAML goes to --out, never into configs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, BenchRun, parse_bench_args, print_table  # noqa: E402

from moe_offload.corpus import stdlib_prompts  # noqa: E402
from moe_offload.loading.config import SEARCHED_DEFAULTS_FILE  # noqa: E402
from moe_offload.simulate.defaults import (  # noqa: E402
    DefaultsSearch,
    record_traces,
    search_defaults,
    shipped_replays,
)

SHIPPED = REPO / "configs" / SEARCHED_DEFAULTS_FILE
PROMPT_LINES = 3    # lines of each held-out file per prompt (short prompts: the search is about decode)


def recipe(args: argparse.Namespace) -> DefaultsSearch:
    if args.check:
        return DefaultsSearch.from_dict(yaml.safe_load(SHIPPED.read_text())["search"])
    search = DefaultsSearch(prompts=tuple(stdlib_prompts(args.prompts, held_out=True, lines=PROMPT_LINES)),
                            max_new_tokens=args.new_tokens)
    return dataclasses.replace(search, depths=(1, 2)) if args.smoke else search


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    search = recipe(args)
    traces = record_traces(search, progress=not args.smoke)
    result = search_defaults(search, shipped_replays(search, traces), progress=not args.smoke)
    rows = [{"choice": name, "speedup": speedup, **{f"{m}/{hw}": result.tokens_per_s[m][hw][name]
                                                   for m in search.models for hw in search.hardware}}
            for name, speedup in sorted(result.speedups.items(), key=lambda kv: -kv[1])]
    print_table(rows, [("choice", "predictor@depth", "s"), ("speedup", "x no prefetch (geomean)", ".4f"),
                       *((k, k, ".2f") for k in rows[0] if "/" in k)])
    print(f"pick: predictor {result.predictor}, prefetch depth {result.prefetch_depth}")
    if args.check:
        shipped = yaml.safe_load(SHIPPED.read_text())
        same = (shipped["predictor"], shipped["prefetch_depth"]) == (result.predictor, result.prefetch_depth)
        print(f"{SHIPPED} {'matches' if same else 'DIFFERS from'} the search")
        return 0 if same else 1
    target = run.path(SEARCHED_DEFAULTS_FILE) if args.smoke else SHIPPED
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(result.yaml_text(search, run.command))
    print(f"wrote {target}")
    pick = {"predictor": result.predictor, "prefetch_depth": result.prefetch_depth}
    print(f"wrote {run.write_json('runtime_defaults.json', {'search': search.to_dict(), 'rows': rows, 'pick': pick})}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts traced per model (default 4)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    parser.add_argument("--check", action="store_true", help="search again from the shipped file's recipe and compare")
    sys.exit(main(parse_bench_args(parser, None, {"prompts": 1, "new_tokens": 4})))
