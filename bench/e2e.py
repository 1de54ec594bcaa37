"""End-to-end tokens/s: plain transformers vs offloaded (all experts resident, 25% of slots).

    python bench/e2e.py [--model tiny-mixtral] [--device cpu|cuda] [--prompt-tokens 128] [--new-tokens 32]

Prints a table and writes bench/results/e2e-<device>.json (with each row's spread: the interquartile range
of its repeats over their median).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_offload  # noqa: E402
from moe_offload.loading.checkpoint import resolve_model_dir  # noqa: E402

from common import BenchRun, device_name, median, parse_bench_args, print_table  # noqa: E402


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_prefill(model, ids: torch.Tensor, device: str, repeats: int) -> list[float]:
    """Seconds of one forward over the whole prompt, per repeat."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # first is warm-up
            sync(device)
            t0 = time.perf_counter()
            model(ids)
            sync(device)
            times.append(time.perf_counter() - t0)
    return times[1:]


def time_decode(model, ids: torch.Tensor, new_tokens: int, device: str, repeats: int) -> list[float]:
    """Seconds per generated token after the first (greedy, KV cache), per repeat."""
    from moe_offload.cli.streaming import TimedStreamer

    per_token = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            streamer = TimedStreamer(tokenizer=None, quiet=True)
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           streamer=streamer, pad_token_id=0)
            t = streamer.timing()
            per_token.append(t.decode_s / max(t.new_tokens - 1, 1))
    return per_token[1:]


def spread(times: list[float]) -> float:
    """The repeats' noise: interquartile range over the median (0 with fewer than two repeats)."""
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, method="inclusive")
    return (q3 - q1) / median(times)


def variants(path: Path, device: str, dtype: torch.dtype):
    yield "transformers", "plain model, all weights on device", lambda: AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype).to(device).eval()
    yield "offload-100%", "every expert has a slot", lambda: moe_offload.from_pretrained(
        path, device=device, dtype=dtype, progress=False)
    yield "offload-25%", "25% of experts have slots, default (score) policy", lambda: quarter(path, device, dtype)


def quarter(path: Path, device: str, dtype: torch.dtype):
    probe = moe_offload.from_pretrained(path, device=device, dtype=dtype, expert_slots=1, progress=False)
    slots = max(1, round(0.25 * probe.offload.plan.num_experts))
    del probe
    return moe_offload.from_pretrained(path, device=device, dtype=dtype, expert_slots=slots, progress=False)


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    path = resolve_model_dir(args.model)
    dtype = moe_offload.loading.config.parse_dtype(args.dtype) or torch.float32
    torch.manual_seed(0)
    vocab = AutoModelForCausalLM.from_pretrained(path).config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_tokens)).to(args.device)
    rows = []
    for name, what, build in variants(path, args.device, dtype):
        model = build()
        prefill = time_prefill(model, ids, args.device, args.repeats)
        decode = time_decode(model, ids[:, : args.decode_prompt], args.new_tokens, args.device, args.repeats)
        row = {"variant": name, "what": what, "prefill_tokens_per_s": args.prompt_tokens / median(prefill),
               "decode_tokens_per_s": 1 / median(decode), "prefill_spread": spread(prefill),
               "decode_spread": spread(decode)}
        if hasattr(model, "offload"):
            row |= {"slots": model.offload.plan.slots, "experts": model.offload.plan.num_experts,
                    "moe_layers": len(model.offload.moe_layers), "hit_rate": model.offload.stats.hit_rate}
        rows.append(row)
        del model
    base = rows[0]
    for row in rows:
        row["prefill_vs_transformers"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        row["decode_vs_transformers"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        if "moe_layers" in row:   # what the engine adds to each MoE layer call in decode, beyond transformers
            extra_s = 1 / row["decode_tokens_per_s"] - 1 / base["decode_tokens_per_s"]
            row["decode_overhead_us_per_layer"] = extra_s / row["moe_layers"] * 1e6
    print(f"model {args.model} on {device_name(args.device)}, {dtype}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print_table(rows, [("variant", "variant", ""), ("prefill_tokens_per_s", "prefill tok/s", ".1f"),
                       ("prefill_vs_transformers", "x plain", ".2f"), ("decode_tokens_per_s", "decode tok/s", ".1f"),
                       ("decode_vs_transformers", "x plain", ".2f"),
                       ("decode_overhead_us_per_layer", "us/layer", ".0f")])
    out = run.write_json(f"e2e-{device_name(args.device)}.json", {
        "model": args.model, "device": device_name(args.device), "dtype": str(dtype),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats, "results": rows})
    print(f"wrote {out}")
    return 0


SMOKE = {"prompt_tokens": 8, "decode_prompt": 4, "new_tokens": 3, "repeats": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-mixtral")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-prompt", type=int, default=16, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    return parse_bench_args(p, argv, SMOKE)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
