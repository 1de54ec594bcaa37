"""Per-layer routing statistics of an MoE checkpoint on held-out standard-library text.

For every MoE layer it reports

* the entropy of expert usage (share of routed slots each expert receives),
  in nats, next to its maximum ``ln E`` (perfectly even use of E experts);
* the share of a token's top-k expert ids that the previous token at the
  same layer also selected ("repeat share"), next to two references: uniform
  random routing (``k / E``) and independent routing that keeps the observed
  per-expert usage (``sum_e P(e selected)^2 / k``);
* the probability that the whole top-k set equals the previous token's
  (uniform reference ``1 / C(E, k)``).

Routing is captured with forward hooks on each layer's ``mlp.gate`` router,
which returns ``(router_logits, top_k_weights, top_k_index)``.

    python bench/routing_stats.py --model tiny-mixtral
    python bench/routing_stats.py --model path/to/checkpoint --out DIR
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch
from tqdm import tqdm

from moe_offload.corpus import read_text, stdlib_split
from moe_offload.models import shipped_model_dir

from common import BenchRun, parse_bench_args  # bench/ is this script's directory

_GATE_NAME = re.compile(r"layers\.(\d+)\.mlp\.gate$")


def resolve_model(name_or_path: str) -> Path:
    """Directory of a shipped model's short name, else ``name_or_path`` itself."""
    shipped = shipped_model_dir(name_or_path)
    return shipped if shipped is not None else Path(name_or_path)


def router_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """{layer index: router module} for every ``model.layers.<i>.mlp.gate``."""
    routers = {}
    for name, module in model.named_modules():
        match = _GATE_NAME.search(name)
        if match:
            routers[int(match.group(1))] = module
    return dict(sorted(routers.items()))


class RouterCapture:
    """Records every MoE layer's selected expert ids while active (a context manager)."""

    def __init__(self, model: torch.nn.Module):
        self.routers = router_modules(model)
        self.selected: dict[int, list[torch.Tensor]] = {i: [] for i in self.routers}
        self._handles: list = []

    def __enter__(self) -> "RouterCapture":
        for idx, router in self.routers.items():
            self._handles.append(router.register_forward_hook(self._hook(idx)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, idx: int):
        def hook(module, inputs, output):
            self.selected[idx].append(output[2].detach())  # (tokens, top_k) expert ids
        return hook

    def take(self) -> dict[int, list[torch.Tensor]]:
        """The ids recorded since the last call, one (tokens, top_k) tensor per forward; then clears."""
        taken = self.selected
        self.selected = {i: [] for i in self.routers}
        return taken


def usage_entropy(ids: torch.Tensor, num_experts: int) -> float:
    """Entropy in nats of the share of routed slots each expert gets; ids: (tokens, top_k)."""
    counts = torch.bincount(ids.flatten(), minlength=num_experts).double()  # (E,)
    share = counts / counts.sum()
    share = share[share > 0]
    return float(-(share * share.log()).sum())


def repeat_stats(sequences: list[torch.Tensor], num_experts: int) -> tuple[float, float]:
    """(mean share of top-k ids shared with the previous token, P(identical set)).

    ``sequences``: one (tokens, top_k) tensor per text window; pairs never cross windows.
    """
    shared, same, pairs = 0.0, 0, 0
    for ids in sequences:
        if ids.shape[0] < 2:
            continue
        mask = torch.zeros(ids.shape[0], num_experts, dtype=torch.bool)  # (tokens, E)
        mask.scatter_(1, ids, True)
        overlap = (mask[1:] & mask[:-1]).sum(dim=1)  # (tokens-1,)
        shared += float(overlap.sum()) / ids.shape[1]
        same += int((overlap == ids.shape[1]).sum())
        pairs += ids.shape[0] - 1
    return shared / pairs, same / pairs


def independent_repeat_share(ids: torch.Tensor, num_experts: int) -> float:
    """Repeat share expected if tokens routed independently with the observed usage; ids: (tokens, top_k)."""
    p_selected = torch.bincount(ids.flatten(), minlength=num_experts).double() / ids.shape[0]  # (E,)
    return float((p_selected**2).sum()) / ids.shape[1]


def layer_stats(sequences: list[torch.Tensor], num_experts: int) -> dict:
    """All statistics of one MoE layer from its per-window (tokens, top_k) id tensors."""
    ids = torch.cat(sequences)  # (all tokens, top_k)
    top_k = ids.shape[1]
    repeat_share, same_set = repeat_stats(sequences, num_experts)
    return {
        "tokens": int(ids.shape[0]),
        "num_experts": num_experts,
        "top_k": top_k,
        "usage_entropy_nats": usage_entropy(ids, num_experts),
        "max_entropy_nats": math.log(num_experts),
        "repeat_share": repeat_share,
        "repeat_share_uniform": top_k / num_experts,
        "repeat_share_independent": independent_repeat_share(ids, num_experts),
        "same_set": same_set,
        "same_set_uniform": 1.0 / math.comb(num_experts, top_k),
    }


def heldout_windows(tokenizer, seq_len: int, max_tokens: int, holdout_every: int = 20) -> list[torch.Tensor]:
    """Held-out stdlib files tokenized and cut into windows of at most ``seq_len`` ids, ``max_tokens`` in all."""
    _, held_out = stdlib_split(holdout_every)
    windows, total = [], 0
    for text in read_text(held_out):
        ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])  # (doc_tokens,)
        for start in range(0, ids.numel() - 1, seq_len):
            window = ids[start : start + seq_len][: max_tokens - total]
            windows.append(window)
            total += window.numel()
            if total >= max_tokens:
                return windows
    return windows


@torch.no_grad()
def collect_routing(model, windows: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """Runs each window (batch of one) and returns {layer: [(tokens, top_k) ids per window]}."""
    model.eval()
    per_layer: dict[int, list[torch.Tensor]] = {}
    with RouterCapture(model) as capture:
        for window in tqdm(windows, desc="routing", leave=False):
            model(input_ids=window[None].to(model.device), use_cache=False)
            for idx, ids in capture.take().items():
                per_layer.setdefault(idx, []).append(torch.cat(ids).cpu())
    return per_layer


def routing_stats(model, tokenizer, seq_len: int = 512, max_tokens: int = 32768) -> dict:
    """Statistics of every MoE layer of ``model`` on held-out text: {"layers": {idx: {...}}, ...}."""
    num_experts = model.config.num_local_experts
    per_layer = collect_routing(model, heldout_windows(tokenizer, seq_len, max_tokens))
    layers = {str(idx): layer_stats(seqs, num_experts) for idx, seqs in per_layer.items()}
    return {
        "entropy_unit": "nats",
        "text": "held-out Python standard-library files",
        "seq_len": seq_len,
        "layers": layers,
        "mean": {key: sum(l[key] for l in layers.values()) / len(layers)
                 for key in ("usage_entropy_nats", "repeat_share", "repeat_share_independent", "same_set")},
    }


def format_table(stats: dict) -> str:
    """A per-layer text table of ``routing_stats`` output."""
    header = (f"{'layer':>5} {'H (nats)':>9} {'ln E':>6} {'repeat':>7} {'uniform':>8} "
              f"{'indep.':>7} {'same set':>9} {'uniform':>9}")
    rows = [header]
    for idx, s in stats["layers"].items():
        rows.append(f"{idx:>5} {s['usage_entropy_nats']:9.3f} {s['max_entropy_nats']:6.3f} "
                    f"{s['repeat_share']:7.3f} {s['repeat_share_uniform']:8.3f} "
                    f"{s['repeat_share_independent']:7.3f} {s['same_set']:9.4f} {s['same_set_uniform']:9.2g}")
    return "\n".join(rows)


def markdown_table(stats: dict) -> str:
    """The same table in Markdown, for model cards."""
    rows = ["| layer | usage entropy (nats) | max ln E | repeat share | uniform k/E | independent | same set | uniform 1/C(E,k) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for idx, s in stats["layers"].items():
        rows.append(f"| {idx} | {s['usage_entropy_nats']:.3f} | {s['max_entropy_nats']:.3f} | "
                    f"{s['repeat_share']:.3f} | {s['repeat_share_uniform']:.3f} | "
                    f"{s['repeat_share_independent']:.3f} | {s['same_set']:.4f} | {s['same_set_uniform']:.2g} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="shipped short name (tiny-mixtral, tiny-deepseek) or a directory")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--dtype", default="float32",
                        help="compute dtype: float32 (default; bf16 weights upcast exactly), bfloat16 or auto")
    parser.add_argument("--threads", type=int, default=2)
    return parse_bench_args(parser, argv, {"seq_len": 64, "max_tokens": 256})


def main(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = BenchRun.start(args)
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stats = routing_stats(model, tokenizer, args.seq_len, args.max_tokens)
    stats["model"] = model_dir.name
    out = run.write_json(f"routing-{model_dir.name}.json", stats)
    print(f"{model_dir.name}: {stats['text']}, {stats['layers'][next(iter(stats['layers']))]['tokens']} tokens")
    print(format_table(stats))
    print(f"wrote {out}")
    return stats


if __name__ == "__main__":
    main(parse_args())
