"""Load test of `moe-offload serve`: N concurrent streaming clients (1, 4, 16), each sending M requests,
against a server this script starts on a free loopback port, at 25% and 100% of expert slots.

    python bench/serve_load.py [--model tiny-mixtral] [--clients 1,4,16] [--requests 4] [--max-tokens 32]

Per level: aggregate generated tokens/s (all clients' tokens over the wall time), time to first token
and per-token latency p50/p99 (client side, from the stream), expert GB copied per generated token
(from /metrics), and how many requests got a full answer or a clear error (an OpenAI error object)
and how many neither. Server RSS after warm-up and after the last level. Writes
bench/results/serve_load.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openai
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_offload.corpus import stdlib_prompts  # noqa: E402
from moe_offload.serve.process import ServerProcess  # noqa: E402

from common import BenchRun, parse_bench_args, print_table  # noqa: E402


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: outcome ('full', 'error': an OpenAI error, 'broken': neither), timings."""
    start = time.perf_counter()
    first = last = reason = None
    tokens = 0
    try:
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True):
            now = time.perf_counter()
            first = first or now
            last = now
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
                reason = chunk.choices[0].finish_reason
    except openai.APIStatusError as err:
        return {"outcome": "error" if err.body else "broken", "status": err.status_code}
    except (openai.APIError, ValueError):
        return {"outcome": "broken"}
    if not tokens or reason not in ("stop", "length"):
        return {"outcome": "broken"}
    return {"outcome": "full", "tokens": tokens, "ttft_s": first - start,
            "per_token_s": (last - first) / (tokens - 1) if tokens > 1 else None}


def run_level(server: ServerProcess, model: str, prompts: list[str], clients: int, requests: int,
              max_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests`` requests one after another."""
    results: list[dict] = []
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=600)
        for r in range(requests):
            result = one_request(client, model, prompts[(c * requests + r) % len(prompts)], max_tokens)
            with lock:
                results.append(result)

    before = server.metrics()
    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = server.metrics()
    return summarize(results, wall, before, after) | {"clients": clients, "requests": clients * requests}


def summarize(results: list[dict], wall: float, before: dict, after: dict) -> dict:
    full = [r for r in results if r["outcome"] == "full"]
    tokens = sum(r["tokens"] for r in full)
    ttft = [r["ttft_s"] for r in full]
    per_token = [r["per_token_s"] for r in full if r["per_token_s"] is not None]
    copied = after["moe_offload_expert_copied_bytes_total"] - before["moe_offload_expert_copied_bytes_total"]
    steps = after["moe_offload_decode_steps_total"] - before["moe_offload_decode_steps_total"]
    rows = after["moe_offload_decode_sequences_total"] - before["moe_offload_decode_sequences_total"]

    def pct(values, q):
        return float(np.percentile(values, q)) * 1e3 if values else None

    return {"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "per_token_p50_ms": pct(per_token, 50), "per_token_p99_ms": pct(per_token, 99),
            "gb_copied_per_token": copied / 1e9 / tokens if tokens else None,
            "mean_batch": rows / steps if steps else None,
            "full": len(full), "clear_errors": sum(r["outcome"] == "error" for r in results),
            "broken": sum(r["outcome"] == "broken" for r in results)}


def run_budget(args: argparse.Namespace, slots: int, prompts: list[str], log: Path) -> dict:
    """Start a server with ``slots`` expert slots, warm it up, run every client level, stop it."""
    flags = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--expert-slots", str(slots),
             "--max-batch", str(max(args.clients)), "--max-queue", str(4 * max(args.clients))]
    server = ServerProcess(flags, log)
    try:
        server.wait_ready(timeout=300)
        rss = psutil.Process(server.proc.pid)
        run_level(server, args.model, prompts, clients=4, requests=1, max_tokens=args.max_tokens)  # warm-up
        rss_warm = rss.memory_info().rss
        levels = [run_level(server, args.model, prompts, n, args.requests, args.max_tokens) for n in args.clients]
        rss_after = rss.memory_info().rss
    finally:
        server.stop()
    return {"slots": slots, "rss_after_warmup_mb": rss_warm / 2**20, "rss_after_mb": rss_after / 2**20,
            "rss_change": rss_after / rss_warm - 1, "levels": levels}


def routed_experts(args: argparse.Namespace) -> int:
    """The model's routed experts (MoE layers x experts), from a load with one slot."""
    import moe_offload

    probe = moe_offload.from_pretrained(args.model, device=args.device, dtype=args.dtype, expert_slots=1,
                                        progress=False)
    count = probe.offload.plan.num_experts
    probe.offload.close()
    return count


def plot(path: Path, budgets: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed_ax, copy_ax, lat_ax) = plt.subplots(1, 3, figsize=(14, 4))
    for b in budgets:
        clients = [lv["clients"] for lv in b["levels"]]
        label = f"{b['budget']} of experts ({b['slots']} slots)"
        speed_ax.plot(clients, [lv["tokens_per_s"] for lv in b["levels"]], marker="o", label=label)
        copy_ax.plot(clients, [(lv["gb_copied_per_token"] or 0) * 1e3 for lv in b["levels"]], marker="o", label=label)
        lat_ax.plot(clients, [lv["per_token_p50_ms"] for lv in b["levels"]], marker="o", label=label + " p50")
    speed_ax.set(xlabel="concurrent clients", ylabel="generated tokens / s", title="aggregate throughput")
    copy_ax.set(xlabel="concurrent clients", ylabel="MB copied / generated token", title="expert copies")
    lat_ax.set(xlabel="concurrent clients", ylabel="ms", title="per-token latency")
    for ax in (speed_ax, copy_ax, lat_ax):
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    prompts = stdlib_prompts(64, held_out=True, lines=args.prompt_lines)
    experts = routed_experts(args)
    budgets = []
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in (0.25, 1.0):
            slots = max(1, round(fraction * experts))
            result = run_budget(args, slots, prompts, Path(tmp) / f"server-{slots}.log")
            budgets.append({"budget": f"{fraction:.0%}", **result})
    rows = [{"budget": b["budget"], "slots": b["slots"], **lv} for b in budgets for lv in b["levels"]]
    print(f"model {args.model} on {args.device}, {args.dtype}, {args.requests} requests per client, "
          f"{args.max_tokens} tokens each, greedy, streamed")
    print_table(rows, [("budget", "budget", ""), ("slots", "slots", "d"), ("clients", "clients", "d"),
                       ("tokens_per_s", "tok/s", ".1f"),
                       ("mean_batch", "batch", ".1f"), ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
                       ("ttft_p99_ms", "p99", ".0f"), ("per_token_p50_ms", "tok p50 ms", ".1f"),
                       ("per_token_p99_ms", "p99", ".1f"), ("gb_copied_per_token", "GB/token", ".4f"),
                       ("full", "full", "d"), ("clear_errors", "errors", "d"), ("broken", "broken", "d")])
    for b in budgets:
        print(f"{b['budget']}: server RSS {b['rss_after_warmup_mb']:.0f} MiB after warm-up, "
              f"{b['rss_after_mb']:.0f} MiB after the load ({b['rss_change']:+.1%})")
    out = run.write_json("serve_load.json", {
        "model": args.model, "device": args.device, "dtype": args.dtype, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "prompt_lines": args.prompt_lines, "budgets": budgets})
    plot(run.path("serve_load.png"), budgets, f"moe-offload serve, {args.model} {args.dtype} on {args.device}, "
         f"{args.requests} requests x {args.max_tokens} tokens per client")
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return 0 if all(lv["broken"] == 0 for lv in rows) else 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-mixtral")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clients", type=lambda t: [int(x) for x in t.split(",")], default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=4, help="requests per client (M)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-lines", type=int, default=6, help="lines of a stdlib file per prompt")
    return parse_bench_args(p, argv, {"clients": [1, 2], "requests": 1, "max_tokens": 4, "prompt_lines": 2})


if __name__ == "__main__":
    sys.exit(main(parse_args()))
