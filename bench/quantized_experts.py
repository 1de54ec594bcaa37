"""Quantized experts: what each stored format costs in accuracy and buys in bytes and projected speed.

    python bench/quantized_experts.py                       # ~3 minutes on a 2-core machine
    python bench/quantized_experts.py --tokens 2048 --budget 24GiB --hardware rtx4090-pcie4
    python bench/quantized_experts.py --smoke [--out DIR]   # seconds: one model, few tokens; writes only with --out

Three parts, one run:

1. Accuracy on the shipped trained models (real weights, float32 compute, held-out standard-library
   text): per expert format, the relative error of the expert weights, of the logits against the
   unquantized model, the held-out next-token loss and how often the greedy next token agrees. Each
   integer format is scored weight-only (float activations) and with its "-a8" twin (activations
   rounded to int8 per block of 64, the arithmetic of the integer CPU kernels).
2. Loading: the first load quantizes (and writes the quantize-once cache file); the second reads
   the cache file. Seconds of each, side by side.
3. Projection for Mixtral-8x7B shapes (config only) on a hardware profile with one GPU memory
   budget: bytes per expert, expert slots that fit, and simulated decode tokens/s (synthetic trace
   with the shipped models' locality, score policy, CPU experts auto, no prefetch).

Writes quantized_experts.json and .png under --out (default bench/results).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moe_offload  # noqa: E402
from moe_offload.corpus import stdlib_prompts  # noqa: E402
from moe_offload.cpu_kernels.packed import PACKED, WEIGHT_ONLY, ExpertFormat  # noqa: E402
from moe_offload.loading.config import OffloadConfig  # noqa: E402
from moe_offload.loading.parts import ModelParts  # noqa: E402
from moe_offload.predictor.synthetic import SyntheticTraceConfig, synthetic_trace  # noqa: E402
from moe_offload.runtime.cost import CostModel, HardwareProfile  # noqa: E402
from moe_offload.simulate import RoutingArrays, Simulator  # noqa: E402
from moe_offload.simulate.sweep import SYNTHETIC_LOCALITY  # noqa: E402

from common import BenchRun, parse_bench_args, print_table  # noqa: E402

FORMATS = ("float32", "bfloat16", *PACKED)
GGUF_TYPES = ("Q8_0", "Q4_0")   # llama-quantize types scored in the GGUF rows (32-value blocks: the tiny rows' width)


def held_out_ids(model_name: str, tokens: int) -> torch.Tensor:
    """[1, tokens] held-out standard-library text, tokenized by the shipped model's tokenizer."""
    from transformers import AutoTokenizer

    from moe_offload.loading.checkpoint import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(model_name))
    text = "\n".join(stdlib_prompts(64, held_out=True))
    return tok(text, return_tensors="pt").input_ids[:, :tokens]


def weight_error(model, reference) -> float:
    """Mean over experts of ||W_q - W|| / ||W|| (gate_up and down together)."""
    errors = []
    store = model.offload.store
    for key in range(store.num_keys):
        gate_up, down = store.format.unpack(store.block(key))
        layer, expert = divmod(key, store.num_experts)
        ref_gu, ref_down = reference[layer][expert]
        diff = (gate_up.float() - ref_gu).norm() ** 2 + (down.float() - ref_down).norm() ** 2
        errors.append((diff / (ref_gu.norm() ** 2 + ref_down.norm() ** 2)).sqrt().item())
    return sum(errors) / len(errors)


def score(model, model_name: str, name: str, ids: torch.Tensor, logits: torch.Tensor, reference) -> dict:
    """One accuracy row of ``model`` against the float32 model's ``logits`` on ``ids``."""
    with torch.no_grad():
        got = model(ids).logits[0]
    loss = torch.nn.functional.cross_entropy(got[:-1], ids[0, 1:]).item()
    base_loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()
    return {"model": model_name, "format": name, "bytes_per_expert": model.offload.store.bytes_per_expert,
            "weight_rel_err": weight_error(model, reference) if reference is not None else None,
            "logits_rel_err": ((got - logits).norm() / logits.norm()).item(),
            "loss": loss, "loss_delta": loss - base_loss, "loss_change_pct": 100 * (loss / base_loss - 1),
            "top1_agree": (got.argmax(-1) == logits.argmax(-1)).float().mean().item()}


def gguf_rows(model_name: str, ids: torch.Tensor, llama_cpp: str | None, work: Path) -> tuple[list[dict], list[str]]:
    """The same scores for llama.cpp's own files of the shipped model: its converter's F32 file, then
    llama-quantize's GGUF_TYPES (whole model, and experts only with every other weight in BF16), each
    loaded by moe-offload's GGUF reader and run in float32 against the float32 checkpoint. (rows, notes);
    no rows without a llama.cpp build (--llama-cpp or $LLAMA_CPP_DIR) or when its converter refuses the
    model (a note says why). The tiny models' 128-wide rows hold only 32-value blocks, so K-quants
    (256-value blocks) are not among the types."""
    from llamacpp import LlamaCpp

    from moe_offload.errors import MoEOffloadError
    from moe_offload.loading.checkpoint import resolve_model_dir

    build = LlamaCpp.locate(llama_cpp)
    if build is None or not build.has_tool("llama-quantize"):
        return [], [f"{model_name}: GGUF rows skipped, no llama.cpp build with llama-quantize (--llama-cpp DIR)"]
    base = moe_offload.from_pretrained(model_name, device="cpu", dtype="float32", progress=False)
    with torch.no_grad():
        logits = base(ids).logits[0]
    base.offload.close()
    f32 = work / f"{model_name}-F32.gguf"
    try:
        build.convert(resolve_model_dir(model_name), f32, "f32")
    except MoEOffloadError as err:
        return [], [f"{model_name}: llama.cpp's converter refused it ({str(err).splitlines()[0][:200]})"]
    files = {"GGUF F32": f32}
    for qtype in GGUF_TYPES:
        for experts_only in (False, True):
            out = work / f"{model_name}-{qtype}{'-experts' if experts_only else ''}.gguf"
            build.quantize(f32, out, qtype, experts_only=experts_only)
            files[f"GGUF {qtype}" + (" experts (dense BF16)" if experts_only else "")] = out
    rows, notes = [], []
    for name, path in files.items():
        start = time.perf_counter()
        try:
            model = moe_offload.from_pretrained(str(path), device="cpu", dtype="float32", progress=False)
        except MoEOffloadError as err:
            notes.append(f"{model_name} {name}: not loaded ({err})")
            continue
        row = score(model, model_name, name, ids, logits, None) | {"first_load_s": time.perf_counter() - start,
                                                                   "second_load_s": None, "file_bytes": path.stat().st_size}
        model.offload.close()
        rows.append(row)
    return rows, notes


def accuracy_rows(model_name: str, ids: torch.Tensor, cache: Path, formats=FORMATS) -> list[dict]:
    base = moe_offload.from_pretrained(model_name, device="cpu", dtype="float32", progress=False)
    store = base.offload.store
    reference = [[[t.clone() for t in store.format.unpack(store.block(store.key(layer, e)))]
                  for e in range(store.num_experts)] for layer in range(store.num_layers)]
    with torch.no_grad():
        logits = base(ids).logits[0]
    rows = []
    for name in formats:
        start = time.perf_counter()
        model = moe_offload.from_pretrained(model_name, device="cpu", dtype="float32", expert_dtype=name,
                                            progress=False, quant_cache=str(cache))
        first = time.perf_counter() - start
        start = time.perf_counter()
        moe_offload.from_pretrained(model_name, device="cpu", dtype="float32", expert_dtype=name, progress=False,
                                    quant_cache=str(cache)).offload.close()
        second = time.perf_counter() - start
        rows.append(score(model, model_name, name, ids, logits, reference)
                    | {"first_load_s": first, "second_load_s": second})
        model.offload.close()
    return rows


def projection_rows(budget: str, hardware: str, tokens: int) -> list[dict]:
    """Mixtral-8x7B shapes with ``budget`` of GPU memory, per format (the bf16 checkpoint's dtype)."""
    rows = []
    profile = HardwareProfile.from_yaml(hardware)
    trace = None
    for name in ("bfloat16", *WEIGHT_ONLY):       # "-a8" twins store the same bytes
        parts = ModelParts("mixtral-8x7b", OffloadConfig(device="cpu", gpu_memory=budget, expert_dtype=name),
                           weights=False)
        if trace is None:
            skew, repeat, cross = SYNTHETIC_LOCALITY
            trace = synthetic_trace(SyntheticTraceConfig(tokens=tokens, layers=len(parts.sites),
                                                         experts=parts.num_experts,
                                                         top_k=parts.hf_config.num_experts_per_tok, skew=skew,
                                                         repeat=repeat, cross_layer=cross))
        nbytes = parts.format.nbytes
        cost = CostModel.for_expert(profile, parts.shape.hidden, parts.shape.intermediate, 2, nbytes)
        result = Simulator(RoutingArrays.of(trace), cost, nbytes, "auto").run("score", parts.plan.slots)
        rows.append({"format": name, "bytes_per_expert": nbytes, "slots": parts.plan.slots,
                     "slot_fraction": parts.plan.slots / parts.plan.num_experts, "hit_rate": result.hit_rate,
                     "tokens_per_s": result.tokens_per_s})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
    return rows


def plot(accuracy: list[dict], projection: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    models = list(dict.fromkeys(r["model"] for r in accuracy))
    width = 0.8 / len(models)
    formats = list(dict.fromkeys(r["format"] for r in accuracy))     # every model's bars at its format's place
    for i, name in enumerate(models):
        mine = {r["format"]: r for r in accuracy if r["model"] == name}
        ax1.bar([j + i * width for j, f in enumerate(formats) if f in mine],
                [max(mine[f]["logits_rel_err"], 1e-9) for f in formats if f in mine], width, label=name)
    ax1.set_xticks([j + width / 2 for j in range(len(formats))], formats, rotation=40, ha="right", fontsize=7)
    ax1.set(yscale="log", ylabel="logits relative error vs float32", title="accuracy (shipped models)")
    ax1.legend(fontsize=8)
    ax2.bar([r["format"] for r in projection], [r["tokens_per_s"] for r in projection])
    ax2.set(ylabel="projected decode tokens/s", title="Mixtral-8x7B shapes, one GPU budget")
    ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    run = BenchRun.start(args)
    start = time.perf_counter()
    accuracy = []
    notes = []
    with tempfile.TemporaryDirectory() as cache:
        for name in args.models:
            ids = held_out_ids(name, args.tokens)
            accuracy += accuracy_rows(name, ids, Path(cache), args.formats)
            if not args.no_gguf:
                rows, why = gguf_rows(name, ids, args.llama_cpp, Path(cache))
                accuracy += rows
                notes += why
    for row in accuracy:
        row["activations"] = activation_rounding(row["format"])
    print_table(accuracy, [("model", "model", ""), ("format", "format", ""), ("activations", "activations", ""),
                           ("bytes_per_expert", "bytes/expert", "d"),
                           ("weight_rel_err", "weight err", ".4f"), ("logits_rel_err", "logits err", ".4f"),
                           ("loss_delta", "loss delta", "+.4f"), ("loss_change_pct", "loss change %", "+.2f"),
                           ("top1_agree", "top-1 agree", ".3f"),
                           ("first_load_s", "1st load s", ".2f"), ("second_load_s", "2nd load s", ".2f")])
    projection = projection_rows(args.budget, args.hardware, args.sim_tokens)
    print_table(projection, [("format", "format", ""), ("bytes_per_expert", "bytes/expert", "d"),
                             ("slots", "slots", "d"), ("slot_fraction", "of experts", ".1%"),
                             ("hit_rate", "hit rate", ".1%"), ("tokens_per_s", "tokens/s", ".2f"),
                             ("speedup", "x bf16", ".2f")])
    out = run.write_json("quantized_experts.json", {
        "tokens": args.tokens, "budget": args.budget, "hardware": args.hardware, "sim_tokens": args.sim_tokens,
        "seconds": time.perf_counter() - start, "accuracy": accuracy, "projection": projection, "notes": notes})
    for note in notes:
        print(note)
    plot(accuracy, projection, run.path("quantized_experts.png"))
    print(f"wrote {out} and .png")
    return 0


def activation_rounding(name: str) -> str:
    """How a format computes with its activations (the -a8 twins round them per block)."""
    if name in PACKED and ExpertFormat(name, 2, 2, torch.float32).act_quant:
        return "int8 per 64"
    return "float"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-deepseek"])
    p.add_argument("--tokens", type=int, default=1024, help="held-out tokens scored per model")
    p.add_argument("--budget", default="24GiB", help="GPU memory of the Mixtral-8x7B projection")
    p.add_argument("--hardware", default="rtx4090-pcie4")
    p.add_argument("--sim-tokens", type=int, default=200, help="decode tokens of the projection's trace")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS, help="formats of the accuracy part")
    p.add_argument("--llama-cpp", help="llama.cpp build for the GGUF rows: its converter's and llama-quantize's files "
                                       "of each model, scored the same way (default $LLAMA_CPP_DIR; none: skipped)")
    p.add_argument("--no-gguf", action="store_true", help="skip the GGUF rows")
    return parse_bench_args(p, argv, {"models": ["tiny-mixtral"], "tokens": 16, "sim_tokens": 8,
                                      "formats": ["bfloat16", "int8-a8", "int4", "fp8"]})


if __name__ == "__main__":
    sys.exit(main(parse_args()))
