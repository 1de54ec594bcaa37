"""Engine overhead per MoE layer call in decode: offloaded vs plain transformers.

    python bench/engine_overhead.py [--model tiny-mixtral] [--expert-slots N] [--repeats 15] [--label after]

Both models decode the same greedy tokens, alternating within each repeat so machine
noise hits both alike; (offloaded - plain) seconds per token / MoE layers is what the
engine adds to one layer call (residency, plan, readback, bookkeeping). Prints a
table and writes bench/results/engine-overhead-<device>.json (one entry per label, so
two checkouts can be compared by running it with PYTHONPATH pointing at each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_offload  # noqa: E402

from common import BenchRun, device_name, parse_bench_args, print_table  # noqa: E402


def seconds_per_token(model, ids: torch.Tensor, tokens: int) -> float:
    """Decode seconds per token: (prompt + ``tokens`` + 1) - (prompt + 1), greedy."""
    gen = dict(do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, **gen)
    long = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **gen)
    return (long - (time.perf_counter() - t0)) / tokens


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    torch.manual_seed(0)
    budget = {"expert_slots": args.expert_slots} if args.expert_slots else {}
    model = moe_offload.from_pretrained(args.model, device=args.device, dtype=torch.float32, progress=False, **budget)
    plain = AutoModelForCausalLM.from_pretrained(model.config._name_or_path, dtype=torch.float32).to(args.device)
    layers = len(model.offload.moe_layers)
    ids = torch.randint(0, plain.config.vocab_size, (1, 16)).to(args.device)
    offloaded, reference = [], []
    with torch.inference_mode():
        seconds_per_token(model, ids, 4), seconds_per_token(plain, ids, 4)   # warm up
        for _ in range(args.repeats):
            offloaded.append(seconds_per_token(model, ids, args.tokens))
            reference.append(seconds_per_token(plain, ids, args.tokens))
    extra = [(o - r) / layers * 1e6 for o, r in zip(offloaded, reference)]
    quartiles = statistics.quantiles(extra)
    row = {"label": args.label, "model": args.model, "moe_layers": layers, "slots": model.offload.plan.slots,
           "experts": model.offload.plan.num_experts, "hit_rate": model.offload.stats.hit_rate,
           "plain_ms_per_token": statistics.median(reference) * 1e3,
           "offloaded_ms_per_token": statistics.median(offloaded) * 1e3,
           "overhead_us_per_layer": statistics.median(extra), "overhead_q1_us": quartiles[0],
           "overhead_q3_us": quartiles[2]}
    name = f"engine-overhead-{device_name(args.device)}.json"
    previous = run.path(name)
    report = json.loads(previous.read_text()) if previous.is_file() else {"runs": {}}
    report["runs"][args.label] = row | {"machine": run.machine(), "command": run.command,
                                         "repeats": args.repeats, "tokens": args.tokens}
    rows = list(report["runs"].values())
    print_table(rows, [("label", "label", ""), ("slots", "slots", "d"), ("plain_ms_per_token", "plain ms/tok", ".2f"),
                       ("offloaded_ms_per_token", "offloaded ms/tok", ".2f"),
                       ("overhead_us_per_layer", "us/layer (median)", ".0f"), ("overhead_q1_us", "q1", ".0f"),
                       ("overhead_q3_us", "q3", ".0f")])
    out = run.write_json(name, report)
    print(f"wrote {out}")
    return 0


SMOKE = {"repeats": 2, "tokens": 2, "expert_slots": 12}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-mixtral")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--expert-slots", type=int, help="device expert slots (default: every expert resident)")
    p.add_argument("--label", default="current")
    return parse_bench_args(p, argv, SMOKE)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
