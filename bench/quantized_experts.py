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
        with torch.no_grad():
            got = model(ids).logits[0]
        loss = torch.nn.functional.cross_entropy(got[:-1], ids[0, 1:]).item()
        base_loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()
        rows.append({"model": model_name, "format": name, "bytes_per_expert": model.offload.store.bytes_per_expert,
                     "weight_rel_err": weight_error(model, reference),
                     "logits_rel_err": ((got - logits).norm() / logits.norm()).item(),
                     "loss": loss, "loss_delta": loss - base_loss, "loss_change_pct": 100 * (loss / base_loss - 1),
                     "top1_agree": (got.argmax(-1) == logits.argmax(-1)).float().mean().item(),
                     "first_load_s": first, "second_load_s": second})
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
    for i, name in enumerate(models):
        mine = [r for r in accuracy if r["model"] == name]
        ax1.bar([j + i * width for j in range(len(mine))], [max(r["logits_rel_err"], 1e-9) for r in mine], width,
                label=name)
        ax1.set_xticks([j + width / 2 for j in range(len(mine))], [r["format"] for r in mine], rotation=30)
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
    with tempfile.TemporaryDirectory() as cache:
        for name in args.models:
            accuracy += accuracy_rows(name, held_out_ids(name, args.tokens), Path(cache), args.formats)
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
        "seconds": time.perf_counter() - start, "accuracy": accuracy, "projection": projection})
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
    return parse_bench_args(p, argv, {"models": ["tiny-mixtral"], "tokens": 16, "sim_tokens": 8,
                                      "formats": ["bfloat16", "int8-a8", "int4", "fp8"]})


if __name__ == "__main__":
    sys.exit(main(parse_args()))
