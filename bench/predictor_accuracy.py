"""Expert-predictor accuracy on held-out text: recall of each predictor at distances 1..3.

Two traces with gate inputs: a fit trace (prompts from the shipped models'
training files; popularity and EAM are fitted on it, and the learned correction
too with --refit) and a held-out trace (held-out standard-library files, never
trained on). Each predictor replays the held-out trace token by token, the way
the runtime calls it, and for every MoE layer l and distance d we count how
many of layer l+d's truly selected experts are among its top k (recall) and
top 2k (recall_at_2k) scores.

    python bench/predictor_accuracy.py --model tiny-mixtral
    python bench/predictor_accuracy.py --model tiny-deepseek
    python bench/predictor_accuracy.py --model DIR --trace held.npz --fit-trace fit.npz --refit

Recording the traces is most of the work (tens of minutes on 2 cores for the defaults): each is
recorded once into a trace cache (--trace-cache, default $XDG_CACHE_HOME/moe-offload/traces; with
--smoke a folder inside --out), keyed by a hash of the model's config and weights, the prompts and
the recipe (tokens generated, gate inputs, dtype, device), so a rerun loads them and measures in
seconds. Writes bench/results/predictor-accuracy-<model>.json and .png (recall vs distance).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moe_offload.predictor import (
    PREDICTOR_NAMES,
    CorrectionFitConfig,
    LearnedCorrectionPredictor,
    Predictor,
    RouterParams,
    Trace,
    chance_recall,
    correction_path,
    fit_correction,
    make_predictor,
    replay,
    router_logits,
    selection_scores,
)

from common import BenchRun, parse_bench_args, print_table  # bench/ is this script's directory

DISTANCES = (1, 2, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-mixtral", help="shipped model name or checkpoint directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trace", help="held-out trace with gate inputs (default: record one)")
    p.add_argument("--fit-trace", help="fit trace with gate inputs (default: record one)")
    p.add_argument("--heldout-prompts", type=int, default=100, help="held-out stdlib prompts to record")
    p.add_argument("--fit-prompts", type=int, default=240, help="training-split stdlib prompts to record")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per held-out prompt")
    p.add_argument("--fit-new-tokens", type=int, default=16, help="tokens generated per fit prompt")
    p.add_argument("--trace-cache", help="folder of recorded traces (default $XDG_CACHE_HOME/moe-offload/traces)")
    p.add_argument("--no-trace-cache", action="store_true", help="record the traces afresh and keep them nowhere")
    p.add_argument("--refit", action="store_true",
                   help="fit the learned correction on the fit trace instead of loading the model's saved one")
    p.add_argument("--features", default="layers", help="feature set when refitting (gate, gate+routing, layers)")
    p.add_argument("--predictors", default=",".join(PREDICTOR_NAMES))
    p.add_argument("--threads", type=int, default=2)
    return parse_bench_args(p, argv, SMOKE)


# Two prompts each way, a few tokens, the correction refitted: recording, caching, fitting and every predictor.
SMOKE = {"heldout_prompts": 2, "fit_prompts": 2, "max_new_tokens": 4, "fit_new_tokens": 4, "refit": True}


def load_model(args: argparse.Namespace):
    from moe_offload.cli.common import load_tokenizer
    from moe_offload.loading.loader import from_pretrained

    model = from_pretrained(args.model, device=args.device, progress=False)
    return model, load_tokenizer(model)


def trace_folder(args: argparse.Namespace, run: BenchRun) -> Path | None:
    """Where recorded traces are cached: --trace-cache, a folder of the run's output with --smoke, else the
    user's cache; None with --no-trace-cache (a scratch folder then holds them for this run only)."""
    if args.no_trace_cache:
        return None
    if args.trace_cache:
        return Path(args.trace_cache)
    return run.out / "trace-cache" if run.smoke else None


def get_trace(path: str | None, model, tokenizer, prompts: int, held_out: bool, new_tokens: int,
              folder: Path | None, use_cache: bool) -> tuple[Trace, dict]:
    """A trace with gate inputs, loaded from ``path`` or the trace cache, or recorded from stdlib prompts;
    and how it was obtained (source, seconds)."""
    import tempfile

    from moe_offload.corpus import PROMPT_LINES, stdlib_prompts
    from moe_offload.runtime.tracing import cached_trace

    start = time.perf_counter()
    if path:
        return Trace.load(path), {"source": str(path), "seconds": time.perf_counter() - start}
    label = "heldout" if held_out else "fit"
    meta = {"prompts": f"stdlib-{'heldout' if held_out else 'train'} {prompts} x {PROMPT_LINES} lines",
            "max_new_tokens": new_tokens}
    texts = stdlib_prompts(prompts, held_out=held_out)
    with tempfile.TemporaryDirectory() as scratch:
        trace, file, hit = cached_trace(model, tokenizer, texts, new_tokens, gate_inputs=True,
                                        folder=folder if use_cache else scratch, label=label, meta=meta)
    seconds = time.perf_counter() - start
    how = "loaded from the trace cache" if hit else "recorded"
    print(f"{label} trace {how}: {trace.num_tokens} tokens in {seconds:.1f} s"
          f"{f' ({file})' if use_cache else ''}", file=sys.stderr)
    return trace, {"source": str(file) if use_cache else "recorded, not kept", "cache_hit": hit, "seconds": seconds}


def learned_predictor(args: argparse.Namespace, model_dir: Path, params: RouterParams, fit: Trace
                      ) -> tuple[Predictor, str]:
    """The learned correction: the model's saved one, or (--refit / none saved) one fitted on ``fit``."""
    path = correction_path(model_dir)
    if path.is_file() and not args.refit:
        return make_predictor("learned", params, model_dir=model_dir), f"{model_dir.name}/{path.relative_to(model_dir)}"
    correction = fit_correction(fit, params, CorrectionFitConfig(distances=DISTANCES, feature_set=args.features))
    return LearnedCorrectionPredictor(correction, params), "fitted on the fit trace"


def trace_recipe(trace: Trace) -> dict:
    """How a trace was made, as far as its metadata tells."""
    return {"prompts": trace.meta.get("prompts"), "max_new_tokens": trace.meta.get("max_new_tokens"),
            "tokens": trace.num_tokens, "generated_tokens": int(trace.decode.sum()),
            "sequences": int(len(np.unique(trace.sequence)))}


def routing_reproduced(trace: Trace, params: RouterParams) -> float:
    """Share of the trace's choices that the router params reproduce from the stored gate inputs (sanity)."""
    hits = total = 0
    for layer in range(trace.num_layers):
        gate = torch.from_numpy(trace.gate_inputs[:, layer].astype(np.float32))
        top = selection_scores(params, layer, router_logits(params, layer, gate)).topk(trace.top_k).indices
        truth = torch.from_numpy(trace.expert_ids[:, layer].astype(np.int64))
        hits += int((top.unsqueeze(1) == truth.unsqueeze(2)).any(2).sum())
        total += truth.numel()
    return hits / total


def evaluate(predictor: Predictor, held: Trace) -> list[dict]:
    """One result row per distance: recall and recall_at_2k, over all tokens and over generated ones."""
    start = time.perf_counter()
    counters = replay(predictor, held, DISTANCES)
    decode = replay(_fresh(predictor, held), held, DISTANCES, counted=held.decode) if held.decode.any() else {}
    seconds = time.perf_counter() - start
    rows = []
    for d, c in counters.items():
        row = {"predictor": predictor.name, "distance": d, "recall": c.recall, "recall_at_2k": c.recall_at_2k,
               "per_layer_recall": c.per_layer_recall, "per_layer_recall_at_2k": c.per_layer_recall_at_2k,
               "recall_decode": decode[d].recall if d in decode else None,
               "recall_at_2k_decode": decode[d].recall_at_2k if d in decode else None, "replay_s": seconds}
        rows.append(row)
    return rows


def _fresh(predictor: Predictor, held: Trace) -> Predictor:
    """The oracle walks its trace once; give it a second walk."""
    if hasattr(predictor, "rewind"):
        predictor.rewind()
    return predictor


def plot(rows: list[dict], chance: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "recall", "recall (top k)"), (axes[1], "recall_at_2k", "recall (top 2k)")):
        for name in dict.fromkeys(r["predictor"] for r in rows):
            mine = [r for r in rows if r["predictor"] == name]
            ax.plot([r["distance"] for r in mine], [r[key] for r in mine], marker="o", label=name)
        ax.axhline(chance if key == "recall" else min(1.0, 2 * chance), color="grey", ls=":", label="random")
        ax.set_xlabel("distance d (predict layer l+d at layer l)")
        ax.set_ylabel(label)
        ax.set_xticks(list(DISTANCES))
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from moe_offload.loading.router_params import router_params

    run = BenchRun.start(args)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args)
    model_dir = Path(model.config._name_or_path)
    params = router_params(model).to("cpu")
    folder, use_cache = trace_folder(args, run), not args.no_trace_cache
    fit, fit_how = get_trace(args.fit_trace, model, tokenizer, args.fit_prompts, False, args.fit_new_tokens, folder,
                             use_cache)
    held, held_how = get_trace(args.trace, model, tokenizer, args.heldout_prompts, True, args.max_new_tokens, folder,
                               use_cache)
    if held.gate_inputs is None or fit.gate_inputs is None:
        raise SystemExit("both traces need gate inputs (moe-offload trace --gate-inputs)")
    rows, learned_source = [], None
    for name in args.predictors.split(","):
        if name == "learned":
            predictor, learned_source = learned_predictor(args, model_dir, params, fit)
        else:
            predictor = make_predictor(name, params, fit_trace=fit, replay_trace=held)
        rows += evaluate(predictor, held)
    chance = chance_recall(held.num_experts, held.top_k)
    print(f"{model_dir.name}: {held.num_layers} MoE layers x {held.num_experts} experts, top-{held.top_k}; "
          f"held-out {held.num_tokens} tokens ({int(held.decode.sum())} generated), fit {fit.num_tokens} tokens; "
          f"random recall {chance:.3f}")
    print_table(rows, [("predictor", "predictor", ""), ("distance", "d", "d"), ("recall", "recall", ".3f"),
                       ("recall_at_2k", "recall@2k", ".3f"), ("recall_decode", "recall(gen)", ".3f"),
                       ("recall_at_2k_decode", "recall@2k(gen)", ".3f")])
    payload = {"model": model_dir.name, "model_type": model.config.model_type, "num_layers": held.num_layers,
               "num_experts": held.num_experts, "top_k": held.top_k, "distances": list(DISTANCES),
               "heldout_tokens": held.num_tokens, "heldout_generated_tokens": int(held.decode.sum()),
               "fit_tokens": fit.num_tokens, "heldout_trace": trace_recipe(held) | held_how,
               "fit_trace": trace_recipe(fit) | fit_how,
               "random_recall": chance,
               "random_recall_at_2k": chance_recall(held.num_experts, 2 * held.top_k),
               "routing_reproduced": routing_reproduced(held, params), "learned_correction": learned_source,
               "per_layer_recall_index": "target MoE layer t = l + d (null for t < d)",
               "results": rows}
    out = run.write_json(f"predictor-accuracy-{model_dir.name}.json", payload)
    png = run.path(f"predictor-accuracy-{model_dir.name}.png")
    plot(rows, chance, f"{model_dir.name}: expert prediction recall on held-out text", png)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
