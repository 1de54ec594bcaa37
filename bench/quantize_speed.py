"""Quantize once at llama-quantize speed: the int4 fit's error per second, and quantize-once time vs llama.cpp.

    python bench/quantize_speed.py --checkpoint /data/mixtral-8x7b-l2 --llama-cpp LLAMA_CPP_BUILD_DIR \\
        --gguf /data/mixtral-8x7b-l2-bf16.gguf
    python bench/quantize_speed.py --smoke --out /tmp/q        # seconds: tiny shapes, the shipped tiny-mixtral

Two parts, one run:

1. The int4 fit (cpu_kernels/packed.py Int4Fit): for each setting (least-squares refits of scale and zero,
   HQQ zero-point steps), the Numba quantizer's time per weight and the relative error it leaves, of the
   weights (Frobenius) and of the outputs on random inputs, on N(0, 0.02) matrices of Mixtral-8x7B's width
   and on the shipped tiny-mixtral's trained experts. The default setting is the one whose last step still
   lowered the error by at least MIN_GAIN of itself (the rule is printed next to the library's default).
2. Quantize-once on a checkpoint (``--checkpoint``): the seconds from the bf16 safetensors to the packed
   cache file (read, quantize, checksum, write) for int8 and int4, side by side with ``llama-quantize``
   (``--llama-cpp``: a llama.cpp build folder or its bin/) making Q8_0 and Q4_0 from the same checkpoint's
   BF16 GGUF (``--gguf``: made by llama.cpp's convert_hf_to_gguf.py). Without a build or a GGUF the
   llama.cpp rows are left out, and the run says so. Both sides use every core.

Writes quantize_speed.json (with the machine) under --out (default bench/results).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_offload.cpu_kernels.packed import INT4_FIT, INT4_GROUP, Int4Fit, dequantize_int4  # noqa: E402
from moe_offload.cpu_kernels.quantize_kernels import int4_rows  # noqa: E402
from moe_offload.loading.checkpoint import resolve_model_dir  # noqa: E402
from moe_offload.loading.config import OffloadConfig  # noqa: E402
from moe_offload.loading.loader import fill_experts  # noqa: E402
from moe_offload.loading.parts import ModelParts  # noqa: E402
from moe_offload.transfer import HostExpertStore  # noqa: E402

from common import BenchRun, median, parse_bench_args, print_table  # noqa: E402

SETTINGS = (Int4Fit(0, 0), Int4Fit(1, 0), Int4Fit(2, 0), Int4Fit(3, 0), Int4Fit(4, 0), Int4Fit(6, 0),
            Int4Fit(0, 1), Int4Fit(0, 2), Int4Fit(0, 5), Int4Fit(0, 20), Int4Fit(2, 2))
MIN_GAIN = 0.01          # a refinement step stays in the default if it lowers the error by >= 1% of itself
LLAMA_TYPES = {"int8": "Q8_0", "int4": "Q4_0"}
INPUT_ROWS = 64          # random inputs of the output-error measure


def fit_matrices(smoke: bool) -> dict[str, torch.Tensor]:
    """name -> [R, K] bf16 weights: random N(0, 0.02) of Mixtral-8x7B's hidden width, and the shipped
    tiny-mixtral's trained expert weights (every w1/w3 [I, H] stacked)."""
    from safetensors import safe_open

    gen = torch.Generator().manual_seed(0)
    rows, cols = (64, 512) if smoke else (2048, 4096)
    out = {f"randn {rows}x{cols}": (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)}
    with safe_open(str(resolve_model_dir("tiny-mixtral") / "model.safetensors"), "pt") as f:
        names = [n for n in f.keys() if n.endswith(("w1.weight", "w3.weight"))][: 4 if smoke else None]
        trained = torch.cat([f.get_tensor(n) for n in names]).to(torch.bfloat16)
    out[f"tiny-mixtral {trained.shape[0]}x{trained.shape[1]}"] = trained
    return out


def fit_row(name: str, w: torch.Tensor, group: int, fit: Int4Fit, repeats: int) -> dict:
    """One setting on one matrix: ns per weight (median of ``repeats`` after a warm-up), weight and output error."""
    rows, cols = w.shape
    bits = w.view(torch.int16).numpy().view(np.uint16)
    q = np.empty((rows, cols // 2), np.uint8)
    scale, zero = np.empty((rows, -(-cols // group)), np.int16), np.empty((rows, -(-cols // group)), np.int16)
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        int4_rows(bits, group, fit.ls_steps, fit.hqq_steps, q, scale, zero)
        seconds.append(time.perf_counter() - start)
    deq = dequantize_int4(torch.from_numpy(q), torch.from_numpy(scale).view(torch.float16),
                          torch.from_numpy(zero).view(torch.float16), group)
    x = torch.randn(INPUT_ROWS, cols, generator=torch.Generator().manual_seed(1))   # [N, K]
    exact = x @ w.float().T                                                             # [N, R]
    return {"matrix": name, "group": group, "ls_steps": fit.ls_steps, "hqq_steps": fit.hqq_steps,
            "ns_per_weight": median(seconds[1:]) / w.numel() * 1e9,
            "weight_rel_err": float((deq - w.float()).norm() / w.float().norm()),
            "output_rel_err": float((x @ deq.T - exact).norm() / exact.norm())}


def fit_rows(smoke: bool) -> list[dict]:
    rows = []
    for name, w in fit_matrices(smoke).items():
        for group in INT4_GROUP.values():
            base = None
            for fit in SETTINGS[:3] if smoke else SETTINGS:
                row = fit_row(name, w, group, fit, 1 if smoke else 3)
                base = base or row
                row["err_vs_minmax"] = row["weight_rel_err"] / base["weight_rel_err"]
                rows.append(row)
    return rows


def rule_default(rows: list[dict]) -> Int4Fit:
    """The cheapest least-squares setting after which one more step lowers the mean weight error by < MIN_GAIN
    (over every matrix and group measured); HQQ steps enter only if they beat it at lower time."""
    def mean_err(ls: int, hqq: int) -> float | None:
        errs = [r["weight_rel_err"] for r in rows if (r["ls_steps"], r["hqq_steps"]) == (ls, hqq)]
        return sum(errs) / len(errs) if errs else None

    steps = sorted({r["ls_steps"] for r in rows if r["hqq_steps"] == 0})
    chosen = steps[0]
    for prev, nxt in zip(steps, steps[1:]):
        gain = 1 - mean_err(nxt, 0) / mean_err(prev, 0)
        if gain < MIN_GAIN * (nxt - prev):
            break
        chosen = nxt
    return Int4Fit(chosen, 0)


def quantize_once(checkpoint: Path, fmt: str, folder: Path) -> dict:
    """Seconds of one quantize-once: every routed expert read from the shards, quantized, and written with its
    checksum to a fresh cache file in ``folder``."""
    cfg = OffloadConfig(device="cpu", expert_dtype=fmt, quant_cache=str(folder), progress=True)
    start = time.perf_counter()
    parts = ModelParts(checkpoint, cfg)
    store = HostExpertStore(len(parts.sites), parts.num_experts, parts.shape, parts.dtype, pin=False, fmt=parts.format)
    fill_experts(parts, store, cfg)
    seconds = time.perf_counter() - start
    files = list(folder.glob(f"experts-{fmt}-*.safetensors"))
    row = {"tool": "moe-offload", "format": fmt, "seconds": seconds, "experts": store.num_keys,
           "expert_weights": store.num_keys * 3 * parts.shape.hidden * parts.shape.intermediate,
           "out_bytes": sum(f.stat().st_size for f in files)}
    parts.checkpoint.close()
    for f in files:
        f.unlink()
    return row


def find_llama_quantize(where: str | None) -> Path | None:
    """llama-quantize under a llama.cpp build folder (or its bin/), or None."""
    if not where:
        return None
    for candidate in (Path(where) / "bin" / "llama-quantize", Path(where) / "llama-quantize"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def llama_quantize(tool: Path, gguf: Path, qtype: str, folder: Path) -> dict:
    """Seconds of ``llama-quantize gguf out qtype <cores>``; the output is deleted after."""
    out = folder / f"{gguf.stem}-{qtype}.gguf"
    start = time.perf_counter()
    done = subprocess.run([str(tool), str(gguf), str(out), qtype, str(os.cpu_count())], capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"llama-quantize failed ({done.returncode}): {done.stderr[-2000:]}")
    row = {"tool": "llama-quantize", "format": qtype, "seconds": seconds, "out_bytes": out.stat().st_size}
    out.unlink()
    return row


def speed_rows(args: argparse.Namespace, folder: Path) -> tuple[list[dict], str | None]:
    """Quantize-once rows (ours and llama.cpp's, with ratios) and a note when llama.cpp's are missing."""
    checkpoint = resolve_model_dir(args.checkpoint)
    tool, gguf = find_llama_quantize(args.llama_cpp), Path(args.gguf) if args.gguf else None
    note = None
    if tool is None or gguf is None or not gguf.is_file():
        note = ("no llama.cpp comparison: " + ("no llama-quantize under --llama-cpp" if tool is None
                                                 else f"no BF16 GGUF at --gguf {args.gguf}"))
    rows = []
    for fmt in args.formats:
        ours = quantize_once(checkpoint, fmt, folder)
        if note is None:
            theirs = llama_quantize(tool, gguf, LLAMA_TYPES[fmt], folder)
            ours["llama_format"], ours["llama_seconds"] = theirs["format"], theirs["seconds"]
            ours["ratio_vs_llama"] = ours["seconds"] / theirs["seconds"]
        ours["experts_per_s"] = ours["experts"] / ours["seconds"]
        rows.append(ours)
    return rows, note


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    torch.set_num_threads(os.cpu_count())
    fits = fit_rows(args.smoke) if args.fit else []
    print_table(fits or [{}], [("matrix", "matrix", ""), ("group", "G", "d"), ("ls_steps", "LS steps", "d"),
                       ("hqq_steps", "HQQ steps", "d"), ("ns_per_weight", "ns/weight", ".2f"),
                       ("weight_rel_err", "weight err", ".5f"), ("output_rel_err", "output err", ".5f"),
                       ("err_vs_minmax", "x min-max", ".4f")])
    rule = rule_default(fits) if fits else INT4_FIT
    print(f"rule (each step lowers the error >= {MIN_GAIN:.0%}): {rule}; library default: {INT4_FIT}")
    payload = {"fit": fits, "rule_default": vars(rule), "library_default": vars(INT4_FIT), "min_gain": MIN_GAIN}
    if args.checkpoint:
        with tempfile.TemporaryDirectory(dir=args.work) as folder:
            speed, note = speed_rows(args, Path(folder))
        print_table(speed, [("format", "format", ""), ("experts", "experts", "d"), ("seconds", "ours s", ".1f"),
                            ("experts_per_s", "experts/s", ".2f"), ("llama_format", "llama.cpp", ""),
                            ("llama_seconds", "llama s", ".1f"), ("ratio_vs_llama", "ours / llama", ".2f")])
        if note:
            print(note)
        payload |= {"checkpoint": str(args.checkpoint), "gguf": args.gguf, "quantize_once": speed, "note": note}
    path = run.write_json("quantize_speed.json", payload)
    print(f"wrote {path}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="bf16 checkpoint folder for the quantize-once timing (e.g. a "
                                        "bench/full_size.py Mixtral-8x7B); without it only the fit table runs")
    p.add_argument("--llama-cpp", help="llama.cpp build folder (with bin/llama-quantize)")
    p.add_argument("--gguf", help="the checkpoint as a BF16 GGUF (llama.cpp's convert_hf_to_gguf.py)")
    p.add_argument("--formats", nargs="+", default=list(LLAMA_TYPES), choices=list(LLAMA_TYPES))
    p.add_argument("--work", default=None, help="folder for the temporary outputs (default: the system's temp)")
    p.add_argument("--no-fit", dest="fit", action="store_false", help="skip part 1 (the int4 fit table)")
    # --smoke: seconds (small matrices, three fit settings, tiny-mixtral's experts)
    return parse_bench_args(p, argv, {"checkpoint": "tiny-mixtral"})


if __name__ == "__main__":
    sys.exit(main(parse_args()))
