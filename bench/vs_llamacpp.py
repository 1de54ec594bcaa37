"""moe-offload against llama.cpp on the CPU: the same weights, decode and prefill tokens/s side by side.

    python bench/vs_llamacpp.py --llama-cpp DIR [--model /work/data/mixtral-8x7b-l2] [--threads 2]
                                [--prompt-tokens 64] [--new-tokens 32] [--repeats 3] [--formats bf16 int8 int4]
    python bench/vs_llamacpp.py --smoke --out /tmp/vs   (shipped tiny-mixtral, a few tokens)

DIR is a llama.cpp CPU build (see `python bench/llamacpp.py --help` for how to make one from
llama-cpp-python's sdist; LLAMA_CPP_DIR works too). The checkpoint is converted to a BF16 GGUF
with that build's convert_hf_to_gguf.py; llama-quantize then writes, for each quantized pair, a
file with only the routed experts quantized and every other weight kept in BF16 (so both sides
read the same dense bytes) and a file quantized the usual way (dense weights too). The GGUF files
are kept in --gguf-dir (default: beside the checkpoint, `<model>.gguf/`) and reused when newer
than the checkpoint. llama-bench times prefill (-p) and decode (-n) with --threads threads.

Ours: moe_offload.from_pretrained on the CPU device with every routed expert run by the CPU
runner (cpu_experts="always", one empty slot), dense weights in bf16, torch and the CPU kernels on
--threads threads; prefill is one forward over the prompt, decode the median time per generated
token after the first (bench/e2e.py's timers). Pairs: bf16 vs BF16, int8 vs Q8_0, int4 vs Q4_0.
The first load of a quantized format quantizes the experts once into the user's cache folder.

Prints one table and writes vs_llamacpp.json and vs_llamacpp.png (CPU model and flags, read
bandwidth, llama.cpp version) under --out. Without a llama.cpp build it says so and exits 2; with
--smoke it then runs our half alone (and says so); --ours-only asks for that on purpose.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_offload  # noqa: E402
from moe_offload.errors import MoEOffloadError  # noqa: E402
from moe_offload.loading.checkpoint import resolve_model_dir  # noqa: E402

from common import BenchRun, close_offloaded, median, parse_bench_args, print_table  # noqa: E402
from cpu_kernels import memory_gbps  # noqa: E402
from e2e import time_decode, time_prefill  # noqa: E402
from llamacpp import ENV_VAR, TOOLS, LlamaCpp  # noqa: E402

NO_BUILD_EXIT = 2
DEFAULT_MODEL = "/work/data/mixtral-8x7b-l2"


@dataclass(frozen=True)
class FormatPair:
    ours: str                 # our expert_dtype name ("bf16": the checkpoint's own dtype)
    llamacpp: str             # llama-quantize's type for the same bytes per weight


# the "-a8" formats compute as llama.cpp's quantized dot products do (int8 activations per block); the plain ones
# keep float activations (weight-only)
PAIRS = {p.ours: p for p in (FormatPair("bf16", "BF16"), FormatPair("int8", "Q8_0"), FormatPair("int8-a8", "Q8_0"),
                             FormatPair("int4", "Q4_0"), FormatPair("int4-a8", "Q4_0"))}


@dataclass(frozen=True)
class Speed:
    decode_tokens_per_s: float
    prefill_tokens_per_s: float


@dataclass(frozen=True)
class GgufFiles:
    """The llama.cpp files of one pair: experts-only quantized (dense BF16) and fully quantized."""

    experts_only: Path
    all_quantized: Path | None          # None for BF16 (experts_only is then the plain BF16 file)


def gguf_files(build: LlamaCpp, checkpoint: Path, folder: Path, pairs: list[FormatPair],
               threads: int) -> dict[str, GgufFiles]:
    """Convert once to BF16, then quantize each pair two ways; files newer than the checkpoint are reused."""
    stamp = max(f.stat().st_mtime for f in checkpoint.iterdir())

    def fresh(path: Path) -> bool:
        return path.is_file() and path.stat().st_mtime > stamp

    bf16 = folder / "BF16.gguf"
    steps = [p for p in pairs if p.llamacpp != "BF16"]
    files = {}
    with tqdm(total=1 + 2 * len(steps), desc="llama.cpp files", unit="file") as bar:
        if not fresh(bf16):
            build.convert(checkpoint, bf16, outtype="bf16")
        bar.update()
        for pair in pairs:
            if pair.llamacpp == "BF16":
                files[pair.ours] = GgufFiles(bf16, None)
                continue
            experts, full = folder / f"{pair.llamacpp}-experts.gguf", folder / f"{pair.llamacpp}.gguf"
            for path, experts_only in ((experts, True), (full, False)):
                if not fresh(path):
                    build.quantize(bf16, path, pair.llamacpp, experts_only=experts_only, threads=threads)
                bar.update()
            files[pair.ours] = GgufFiles(experts, full)
    return files


def llamacpp_speed(build: LlamaCpp, model: Path, args: argparse.Namespace) -> tuple[Speed, dict]:
    rows = {r.test[:2]: r for r in build.bench(model, args.prompt_tokens, args.new_tokens, args.threads,
                                               args.repeats)}
    speed = Speed(decode_tokens_per_s=rows["tg"].tokens_per_s, prefill_tokens_per_s=rows["pp"].tokens_per_s)
    return speed, {"file": str(model), "bytes": rows["tg"].model_bytes, "build": rows["tg"].build}


def our_speed(checkpoint: Path, pair: FormatPair, args: argparse.Namespace, quant_cache: str | None) -> Speed:
    model = moe_offload.from_pretrained(
        checkpoint, device="cpu", dtype=torch.bfloat16, cpu_experts="always", expert_slots=1,
        expert_dtype=None if pair.ours == "bf16" else pair.ours, cpu_threads=args.threads, quant_cache=quant_cache,
        progress=not args.smoke)
    try:
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        prefill_s = median(time_prefill(model, ids, "cpu", args.repeats))
        decode_s = median(time_decode(model, ids[:, : args.decode_prompt], args.new_tokens, "cpu", args.repeats))
    finally:
        close_offloaded(model)
        del model
        gc.collect()
    return Speed(decode_tokens_per_s=1 / decode_s, prefill_tokens_per_s=args.prompt_tokens / prefill_s)


def pair_row(pair: FormatPair, ours: Speed, theirs: Speed | None, full: Speed | None) -> dict:
    row = {"pair": f"{pair.ours} vs {pair.llamacpp}", "ours": pair.ours, "llamacpp": pair.llamacpp,
           "ours_decode": ours.decode_tokens_per_s, "ours_prefill": ours.prefill_tokens_per_s}
    if theirs is not None:
        row |= {"llamacpp_decode": theirs.decode_tokens_per_s, "llamacpp_prefill": theirs.prefill_tokens_per_s,
                "decode_ratio": ours.decode_tokens_per_s / theirs.decode_tokens_per_s,
                "prefill_ratio": ours.prefill_tokens_per_s / theirs.prefill_tokens_per_s}
    if full is not None:
        row |= {"llamacpp_all_decode": full.decode_tokens_per_s, "llamacpp_all_prefill": full.prefill_tokens_per_s}
    return row


TABLE = [("pair", "format (ours vs llama.cpp)", ""), ("ours_decode", "decode ours", ".2f"),
         ("llamacpp_decode", "llama.cpp", ".2f"), ("decode_ratio", "ratio", ".2f"),
         ("ours_prefill", "prefill ours", ".2f"), ("llamacpp_prefill", "llama.cpp", ".2f"),
         ("prefill_ratio", "ratio", ".2f"), ("llamacpp_all_decode", "all-quant decode", ".2f"),
         ("llamacpp_all_prefill", "all-quant prefill", ".2f")]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("ours", "moe-offload (CPU experts)"), ("llamacpp", "llama.cpp, dense BF16"),
              ("llamacpp_all", "llama.cpp, all quantized")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, phase in zip(axes, ("decode", "prefill")):
        width = 0.8 / len(series)
        for i, (key, label) in enumerate(series):
            values = [r.get(f"{key}_{phase}", 0.0) for r in rows]
            ax.bar([x + (i - 1) * width for x in range(len(rows))], values, width, label=label)
        ax.set_xticks(range(len(rows)), [r["pair"] for r in rows])
        ax.set_ylabel("tokens/s")
        ax.set_title(phase)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_pairs(args, checkpoint: Path, build: LlamaCpp | None, gguf_dir: Path,
              quant_cache: str | None) -> tuple[list[dict], dict]:
    """One row per format pair, and what each llama.cpp file was (path, bytes, build)."""
    pairs = [PAIRS[f] for f in args.formats]
    files = gguf_files(build, checkpoint, gguf_dir, pairs, args.threads) if build else {}
    rows, files_info = [], {}
    for pair in tqdm(pairs, desc="format pairs", unit="pair"):
        theirs = full = None
        if build is not None:
            theirs, files_info[f"{pair.llamacpp} experts only"] = llamacpp_speed(build, files[pair.ours].experts_only,
                                                                                 args)
            if files[pair.ours].all_quantized is not None:
                full, files_info[f"{pair.llamacpp} all"] = llamacpp_speed(build, files[pair.ours].all_quantized, args)
        ours = our_speed(checkpoint, pair, args, quant_cache)
        rows.append(pair_row(pair, ours, theirs, full))
    return rows, files_info


def main(args: argparse.Namespace) -> int:
    try:
        build = None if args.ours_only else LlamaCpp.locate(args.llama_cpp)
    except MoEOffloadError as e:
        print(e)
        return NO_BUILD_EXIT
    if not args.ours_only and (build is None or not build.built()):
        where = f"{build.bin_dir} lacks {' or '.join(TOOLS)}" if build else f"pass --llama-cpp DIR or set {ENV_VAR}"
        print(f"no llama.cpp build: {where} (`python bench/llamacpp.py --help` says how to build one)")
        build = None
        if not args.smoke:
            return NO_BUILD_EXIT
        print("--smoke: running moe-offload's half only")
    torch.set_num_threads(args.threads)
    checkpoint = resolve_model_dir(args.model)
    run = BenchRun.start(args)
    bandwidth = memory_gbps(repeats=3)
    with tempfile.TemporaryDirectory() as scratch:     # smoke: GGUF files and quantized experts, dropped after
        gguf_dir = Path(scratch) if args.smoke else Path(args.gguf_dir or f"{checkpoint}.gguf")
        rows, files_info = run_pairs(args, checkpoint, build, gguf_dir, scratch if args.smoke else None)
    report(args, checkpoint, build, bandwidth, rows, files_info, run)
    return 0


def report(args, checkpoint: Path, build: LlamaCpp | None, bandwidth: float, rows: list[dict], files_info: dict,
           run: BenchRun) -> None:
    version = build.version() if build else None
    info = run.machine()
    flags = " ".join(info.get("cpu_flags", []))
    print(f"{checkpoint} on {info.get('cpu_model', '?')} ({flags}), {args.threads} threads, read bandwidth "
          f"{bandwidth:.1f} GB/s, llama.cpp {version or 'not run'}; prefill {args.prompt_tokens} tokens, decode "
          f"{args.new_tokens} tokens, tokens/s")
    print_table(rows, TABLE)
    payload = {"model": str(checkpoint), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens, "repeats": args.repeats, "read_gbps": bandwidth,
               "llamacpp_version": version, "llamacpp_files": files_info,
               "pairs": [asdict(PAIRS[f]) for f in args.formats], "ours_only": build is None, "results": rows}
    json_path = run.write_json("vs_llamacpp.json", payload, machine=info)
    plot(rows, run.path("vs_llamacpp.png"), f"{checkpoint.name}: {info.get('cpu_model', '')}, {args.threads} threads, "
         f"{bandwidth:.1f} GB/s read, {flags}; llama.cpp {version or 'not run'}")
    print(f"wrote {json_path} and vs_llamacpp.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", help=f"llama.cpp source or build folder (default: ${ENV_VAR})")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder (bench/full_size.py makes one)")
    p.add_argument("--gguf-dir", help="where the GGUF files go (default: <model>.gguf/ beside the checkpoint)")
    p.add_argument("--formats", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--decode-prompt", type=int, default=4, help="prompt tokens before our decode is timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ours-only", action="store_true", help="moe-offload's half alone (no llama.cpp needed)")
    # --smoke: the shipped tiny-mixtral, a few tokens, nothing kept
    return parse_bench_args(p, argv, {"model": "tiny-mixtral", "prompt_tokens": 8, "new_tokens": 4, "repeats": 1})


if __name__ == "__main__":
    sys.exit(main(parse_args()))
