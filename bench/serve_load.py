"""Load test of `moe-offload serve` against its own engine and against `transformers serve`: N concurrent
streaming clients (1, 4, 16), each sending M requests one after another, at 25% and 100% of expert slots
(--smoke: 100% only).

    python bench/serve_load.py [--model tiny-mixtral] [--clients 1,4,16] [--requests 4] [--max-tokens 32]
                               [--rounds 3] [--no-transformers]

Systems, run on the same prompts in alternated rounds (each round runs every system once per level):
  engine       the BatchEngine alone in this process, no HTTP (the clients are callbacks): the ceiling
  serve        `moe-offload serve` (the engine in its own process), streamed through the official client
  serve-thread `moe-offload serve --engine thread` (the engine in a thread of the HTTP process)
  transformers `transformers serve --continuous-batching` on the same checkpoint (all experts resident,
               plain transformers), started here on a free loopback port
Per level: aggregate generated tokens/s (all clients' tokens over the wall time, median over rounds),
time to first token p50/p99 (client side, pooled over rounds), per-token latency, expert GB copied
per generated token and mean decode batch (from /metrics), and how many requests got a full answer or
a clear error (an OpenAI error object) and how many neither. Server RSS (with its child processes).
Writes bench/results/serve_load.json and .png. In --smoke the transformers row is skipped (its server
takes tens of seconds to start here); the output and JSON say so.
"""

from __future__ import annotations

import argparse
import os
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

from common import BenchRun, median, parse_bench_args, print_table  # noqa: E402

SYSTEMS = ("engine", "serve", "serve-thread", "transformers")
CLIENT_TIMEOUT_S = 600  # one request's limit; a level's client loops are bounded by --requests
TRANSFORMERS_SERVE = (sys.executable, "-c",
                      ("import sys; from transformers.cli.transformers import main; sys.exit(main())"), "serve")


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: outcome ('full', 'error': an OpenAI error, 'broken': neither), timings."""
    start = time.perf_counter()
    first = last = reason = None
    tokens = 0
    try:
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                first = first or now
                last = now
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.APIStatusError as err:
        return {"outcome": "error" if err.body else "broken", "status": err.status_code}
    except (openai.APIError, ValueError):
        return {"outcome": "broken"}
    if not tokens or reason not in ("stop", "length") or first is None:
        return {"outcome": "broken"}
    return {"outcome": "full", "tokens": tokens, "ttft_s": first - start,
            "per_token_s": (last - first) / (tokens - 1) if tokens > 1 else None}


def client_prompts(prompts: list, clients: int, requests: int) -> list[list]:
    """The prompts client ``c`` sends, in order (the same for every system)."""
    return [[prompts[(c * requests + r) % len(prompts)] for r in range(requests)] for c in range(clients)]


class ServedSystem:
    """An OpenAI server under load: ours (with /metrics) or transformers'."""

    def __init__(self, name: str, server: ServerProcess, model_name: str, has_metrics: bool) -> None:
        self.name, self.server, self.model_name, self.has_metrics = name, server, model_name, has_metrics

    def metrics(self) -> dict:
        return self.server.metrics() if self.has_metrics else {}

    def rss(self) -> int:
        """Resident memory of the server and its child processes (our engine process)."""
        root = psutil.Process(self.server.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def run_level(self, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
        """``clients`` threads, each sending its ``requests`` requests one after another."""
        results: list[dict] = []
        lock = threading.Lock()

        def client_loop(mine: list[str]) -> None:
            client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="-", max_retries=0,
                                   timeout=CLIENT_TIMEOUT_S)
            for prompt in mine:
                result = one_request(client, self.model_name, prompt, max_tokens)
                with lock:
                    results.append(result)
            client.close()

        before, cpu = self.metrics(), self.cpu_seconds()
        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(mine,))
                   for mine in client_prompts(prompts, clients, requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        used = {k: v - cpu[k] for k, v in self.cpu_seconds().items()}
        return summarize(results, wall, before, self.metrics()) | {"cpu_s": used}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the server's own process, of its children (our engine process; transformers'
        model process), and of this process (the clients)."""
        root = psutil.Process(self.server.proc.pid)
        return {"server": _cpu(root), "children": sum(_cpu(p) for p in root.children(recursive=True)),
                "clients": _cpu(psutil.Process())}

    def stop(self) -> None:
        self.server.stop()


class EngineAlone:
    """The BatchEngine in this process with no HTTP: each client is a callback that submits its next
    request when the last one finishes."""

    def __init__(self, args: argparse.Namespace, slots: int, max_batch: int) -> None:
        import moe_offload
        from moe_offload.cli.common import load_tokenizer
        from moe_offload.serve.engine import BatchEngine

        self.name = "engine"
        self.model = moe_offload.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                                 expert_slots=slots, progress=False)
        self.tokenizer = load_tokenizer(self.model)
        self.engine = BatchEngine(self.model, self.tokenizer, max_batch=max_batch, max_queue=4 * max_batch)
        self.engine.start()

    def metrics(self) -> dict:
        c, stats = self.engine.counters, self.model.offload.stats
        return {"moe_offload_expert_copied_bytes_total": int(stats.bytes_copied.sum()),
                "moe_offload_decode_steps_total": c.decode_steps, "moe_offload_decode_sequences_total": c.decode_rows}

    def rss(self) -> int:
        return psutil.Process().memory_info().rss

    def run_level(self, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
        from moe_offload.serve.engine import GenerationRequest, SamplingParams

        results: list[dict] = []
        done = threading.Semaphore(0)
        queues = [[self.tokenizer(p)["input_ids"] for p in mine] for mine in client_prompts(prompts, clients, requests)]

        def launch(mine: list[list[int]]) -> None:
            if not mine:
                done.release()
                return
            start, first = time.perf_counter(), []

            def sink(update) -> None:  # runs on the engine thread
                now = time.perf_counter()
                if update.text and not first:
                    first.append(now)
                if update.error is not None:
                    results.append({"outcome": "broken"})
                elif update.finish_reason is not None:
                    tokens = update.completion_tokens
                    results.append({"outcome": "full", "tokens": tokens, "ttft_s": (first or [now])[0] - start,
                                    "per_token_s": (now - first[0]) / (tokens - 1) if tokens > 1 and first else None})
                else:
                    return
                launch(mine[1:])

            self.engine.submit(GenerationRequest(mine[0], SamplingParams(max_tokens=max_tokens), self.tokenizer, sink))

        before, cpu = self.metrics(), _cpu(psutil.Process())
        start = time.perf_counter()
        for mine in queues:
            launch(mine)
        for _ in queues:
            done.acquire(timeout=CLIENT_TIMEOUT_S * requests)
        wall = time.perf_counter() - start
        return summarize(results, wall, before, self.metrics()) | {"cpu_s": {"engine": _cpu(psutil.Process()) - cpu}}

    def stop(self) -> None:
        self.engine.stop()
        self.model.offload.close()


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def summarize(results: list[dict], wall: float, before: dict, after: dict) -> dict:
    full = [r for r in results if r["outcome"] == "full"]
    tokens = sum(r["tokens"] for r in full)

    def delta(name):
        return after[name] - before[name] if name in after else None

    copied, steps = delta("moe_offload_expert_copied_bytes_total"), delta("moe_offload_decode_steps_total")
    rows = delta("moe_offload_decode_sequences_total")
    return {"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_s": [r["ttft_s"] for r in full],
            "per_token_s": [r["per_token_s"] for r in full if r["per_token_s"] is not None],
            "gb_copied_per_token": copied / 1e9 / tokens if tokens and copied is not None else None,
            "mean_batch": rows / steps if steps else None,
            "full": len(full), "clear_errors": sum(r["outcome"] == "error" for r in results),
            "broken": sum(r["outcome"] == "broken" for r in results)}


def pooled(rounds: list[dict]) -> dict:
    """One level's rounds as one row: median tokens/s over rounds, latency percentiles over every request."""

    def pct(key, q):
        values = [v for r in rounds for v in r[key]]
        return float(np.percentile(values, q)) * 1e3 if values else None

    copied = [r["gb_copied_per_token"] for r in rounds if r["gb_copied_per_token"] is not None]
    batch = [r["mean_batch"] for r in rounds if r["mean_batch"] is not None]
    tokens = sum(r["generated_tokens"] for r in rounds)
    cpu_ms = {k: sum(r["cpu_s"][k] for r in rounds) * 1e3 / tokens for k in rounds[0]["cpu_s"]} if tokens else {}
    return {"tokens_per_s": median([r["tokens_per_s"] for r in rounds]),
            "cpu_ms_per_token": cpu_ms,
            "cpu": " ".join(f"{k} {v:.2f}" for k, v in cpu_ms.items()),
            "tokens_per_s_rounds": [r["tokens_per_s"] for r in rounds],
            "ttft_p50_ms": pct("ttft_s", 50), "ttft_p99_ms": pct("ttft_s", 99),
            "per_token_p50_ms": pct("per_token_s", 50), "per_token_p99_ms": pct("per_token_s", 99),
            "gb_copied_per_token": median(copied) if copied else None, "mean_batch": median(batch) if batch else None,
            **{k: sum(r[k] for r in rounds) for k in ("full", "clear_errors", "broken")}}


def start_systems(args: argparse.Namespace, slots: int, tmp: Path) -> list:
    """Every system of this budget, loaded and ready (ours with ``slots`` expert slots)."""
    max_batch = max(args.clients)
    ours = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--expert-slots", str(slots),
            "--max-batch", str(max_batch), "--max-queue", str(4 * max_batch)]
    servers = [("serve", ServerProcess(ours, tmp / f"serve-{slots}.log"), args.model, True),
               ("serve-thread", ServerProcess([*ours, "--engine", "thread"], tmp / f"thread-{slots}.log"),
                args.model, True)]
    if args.transformers:
        directory = checkpoint_directory(args.model)
        # Its paged KV cache is otherwise sized from free memory (14 GiB on a 24 GiB CPU box); 16k tokens hold
        # every level's sequences.
        flags = ["--continuous-batching", "--cb-block-size", "32", "--cb-num-blocks", "512", "--device", args.device,
                 "--dtype", args.dtype, "--host", "127.0.0.1", "--log-level", "warning", directory]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        servers.append(("transformers", ServerProcess(flags, tmp / f"transformers-{slots}.log",
                                                      command=TRANSFORMERS_SERVE, env=env), directory, False))
    systems = []
    try:
        systems.append(EngineAlone(args, slots, max_batch))
        for name, server, model_name, has_metrics in servers:
            server.wait_ready(timeout=600)
            systems.append(ServedSystem(name, server, model_name, has_metrics))
    except BaseException:
        for _, server, _, _ in servers:
            server.stop()
        for system in systems[:1]:
            system.stop()
        raise
    return systems


def checkpoint_directory(model: str) -> str:
    """The checkpoint folder of ``model`` (a shipped model's name resolved), for `transformers serve`."""
    from moe_offload.loading.checkpoint import resolve_model_dir

    return str(resolve_model_dir(model))


def run_budget(args: argparse.Namespace, slots: int, prompts: list[str], tmp: Path) -> dict:
    """Start every system, warm each up, then ``--rounds`` rounds of every level on every system."""
    systems = start_systems(args, slots, tmp)
    try:
        for system in systems:
            system.run_level(prompts, clients=4, requests=1, max_tokens=args.max_tokens)  # warm-up
        rss_warm = {s.name: s.rss() for s in systems}
        rounds = {(s.name, n): [] for s in systems for n in args.clients}
        for _ in range(args.rounds):
            for n in args.clients:
                for system in systems:
                    rounds[system.name, n].append(system.run_level(prompts, n, args.requests, args.max_tokens))
        rss_after = {s.name: s.rss() for s in systems}
    finally:
        for system in systems:
            system.stop()
    levels = [{"system": s.name, "clients": n, **pooled(rounds[s.name, n])} for s in systems for n in args.clients]
    for level in levels:
        level |= ratios(level, rounds, args.rounds)
    return {"slots": slots, "rss_after_warmup_mb": {k: v / 2**20 for k, v in rss_warm.items()},
            "rss_after_mb": {k: v / 2**20 for k, v in rss_after.items()}, "levels": levels}


def ratios(level: dict, rounds: dict, count: int) -> dict:
    """This system's tokens/s over the engine's and over transformers', median of the per-round ratios."""
    mine = rounds[level["system"], level["clients"]]
    out = {}
    for other, key in (("engine", "of_engine"), ("transformers", "vs_transformers")):
        theirs = rounds.get((other, level["clients"]))
        if theirs:
            out[key] = median([mine[i]["tokens_per_s"] / theirs[i]["tokens_per_s"] for i in range(count)
                               if theirs[i]["tokens_per_s"] > 0])
    return out


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

    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for system in dict.fromkeys(lv["system"] for lv in b["levels"]):
            levels = [lv for lv in b["levels"] if lv["system"] == system]
            ax.plot([lv["clients"] for lv in levels], [lv["tokens_per_s"] for lv in levels], marker="o", label=system)
        ax.set(xlabel="concurrent clients", ylabel="generated tokens / s",
               title=f"{b['budget']} of experts ({b['slots']} slots)")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_results(args: argparse.Namespace, budgets: list[dict]) -> list[dict]:
    rows = [{"budget": b["budget"], "slots": b["slots"], **lv} for b in budgets for lv in b["levels"]]
    print(f"model {args.model} on {args.device}, {args.dtype}, {args.requests} requests per client, "
          f"{args.max_tokens} tokens each, greedy, streamed, {args.rounds} alternated rounds")
    print_table(rows, [("budget", "budget", ""), ("system", "system", ""), ("clients", "clients", "d"),
                       ("tokens_per_s", "tok/s", ".1f"), ("of_engine", "of engine", ".2f"),
                       ("vs_transformers", "vs transformers", ".2f"), ("mean_batch", "batch", ".1f"),
                       ("ttft_p50_ms", "TTFT p50 ms", ".0f"), ("ttft_p99_ms", "p99", ".0f"),
                       ("per_token_p50_ms", "tok p50 ms", ".1f"), ("gb_copied_per_token", "GB/token", ".4f"),
                       ("full", "full", "d"), ("clear_errors", "errors", "d"), ("broken", "broken", "d"),
                       ("cpu", "CPU ms per token", "")])
    for b in budgets:
        print(f"{b['budget']}: RSS MiB after warm-up / after the load: " + ", ".join(
            f"{k} {b['rss_after_warmup_mb'][k]:.0f} / {b['rss_after_mb'][k]:.0f}" for k in b["rss_after_mb"]))
    if not args.transformers:
        print(f"transformers serve: skipped {args.transformers_skipped}")
    return rows


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    prompts = stdlib_prompts(64, held_out=True, lines=args.prompt_lines)
    experts = routed_experts(args)
    budgets = []
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in args.budgets:
            slots = max(1, round(fraction * experts))
            budgets.append({"budget": f"{fraction:.0%}", **run_budget(args, slots, prompts, Path(tmp))})
    rows = print_results(args, budgets)
    out = run.write_json("serve_load.json", {
        "model": args.model, "device": args.device, "dtype": args.dtype, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "prompt_lines": args.prompt_lines, "rounds": args.rounds,
        "transformers_row": "measured" if args.transformers else f"skipped {args.transformers_skipped}",
        "budgets": budgets})
    plot(run.path("serve_load.png"), budgets, f"{args.model} {args.dtype} on {args.device}, "
         f"{args.requests} requests x {args.max_tokens} tokens per client, median of {args.rounds} rounds")
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
    p.add_argument("--budgets", type=lambda t: [float(x) for x in t.split(",")], default=[0.25, 1.0],
                   help="shares of the routed experts that fit in the expert slots")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds per level (median tokens/s)")
    p.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="leave out the `transformers serve --continuous-batching` row")
    args = parse_bench_args(p, argv, {"clients": [1, 2], "requests": 1, "max_tokens": 4, "prompt_lines": 2,
                                      "rounds": 1, "budgets": [1.0], "transformers": False})
    args.transformers_skipped = ("in --smoke (its server takes tens of seconds to start here)" if args.smoke
                                 else "left out by --no-transformers")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
