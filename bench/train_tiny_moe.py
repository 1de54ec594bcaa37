"""Train one of the project's tiny MoE language models from scratch on CPU.

The corpus is the Python standard library's own source (see
``moe_offload.corpus``); every 20th file is held out. A byte-level BPE
tokenizer is trained on the training files, then a Mixtral or DeepSeek-V3
model built with transformers' own classes is trained with AdamW (linear
warmup, cosine decay) and saved in bf16 with its tokenizer, a model card
(README.md) and ``training.json``.

Load balancing follows each family:

* mixtral: the Switch-style auxiliary loss of ``MixtralForCausalLM``
  (``output_router_logits=True``, ``router_aux_loss_coef``), applied to each
  layer's router separately and averaged;
* deepseek: auxiliary-loss-free balancing as in DeepSeek-V3 -- after every
  step each router's ``e_score_correction_bias`` moves by ``bias_update_speed``
  towards under-loaded experts (``+speed * sign(mean load - load)``).

    python bench/train_tiny_moe.py --arch mixtral --out moe_offload/models/tiny-mixtral
    python bench/train_tiny_moe.py --arch deepseek --out moe_offload/models/tiny-deepseek
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path

# On a shared CPU, OpenMP threads that spin while waiting for a descheduled
# sibling make every step many times slower; let idle threads sleep instead.
# Takes effect only if set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from moe_offload.corpus import read_text, stdlib_root, stdlib_split

from common import BenchRun, parse_bench_args  # bench/ is this script's directory
from routing_stats import (
    RouterCapture,
    markdown_table,
    routing_stats,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int, max_len: int):
    """Byte-level BPE trained on ``texts``, wrapped as a transformers fast tokenizer that prepends BOS.

    A newline and the indentation after it form one pre-token ("\\n    "), so
    the following word starts a new token: a prompt ending in indentation,
    such as "def main():\\n    ", splits exactly as the same text does in training.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n[ \t]*"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=max_len,
    )


def encode_documents(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one id stream: BOS text EOS BOS text EOS ... -> (total_tokens,)."""
    encoded = tokenizer(texts, verbose=False)["input_ids"]
    stream = [ids + [tokenizer.eos_token_id] for ids in encoded]
    return torch.tensor([i for ids in stream for i in ids], dtype=torch.long)


def make_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of the id stream: (total_tokens,) -> (windows, seq_len)."""
    usable = (stream.numel() // seq_len) * seq_len
    return stream[:usable].view(-1, seq_len)


# ----------------------------------------------------------------------------- model configs

def mixtral_config(args: argparse.Namespace, tokenizer):
    """Mixtral: 8 experts, top-2, GQA attention."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts or 8, num_experts_per_tok=args.top_k or 2,
        max_position_embeddings=args.max_positions, router_aux_loss_coef=args.aux_loss_coef,
        output_router_logits=False, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def deepseek_config(args: argparse.Namespace, tokenizer):
    """DeepSeek-V3: MLA attention, first layer dense, fine-grained routed experts + one shared expert."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads,
        n_routed_experts=args.experts or 32, num_experts_per_tok=args.top_k or 4, n_shared_experts=1,
        n_group=args.n_group, topk_group=args.topk_group, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.qk_rope_head_dim, qk_nope_head_dim=args.qk_nope_head_dim,
        v_head_dim=args.v_head_dim, max_position_embeddings=args.max_positions,
        num_mtp_layers=0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(args: argparse.Namespace, tokenizer):
    """A freshly initialised fp32 model of ``args.arch`` (seeded by the caller)."""
    from transformers import DeepseekV3ForCausalLM, MixtralForCausalLM

    if args.arch == "mixtral":
        return MixtralForCausalLM(mixtral_config(args, tokenizer))
    return DeepseekV3ForCausalLM(deepseek_config(args, tokenizer))


# ----------------------------------------------------------------------------- training

def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over ``args.warmup`` steps, then cosine from lr to lr * min_lr_ratio by progress 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def batch_indices(num_windows: int, batch: int, seed: int):
    """Endless fixed-order stream of (batch,) window indices: a seeded permutation per epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(num_windows, generator=gen)
        for start in range(0, num_windows - batch + 1, batch):
            yield order[start : start + batch]


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases or router correction biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


@torch.no_grad()
def update_correction_bias(capture: RouterCapture, speed: float) -> float:
    """DeepSeek-V3 aux-loss-free balancing step; returns the mean max/mean expert load ratio."""
    imbalance = []
    for idx, chunks in capture.take().items():
        router = capture.routers[idx]
        load = torch.bincount(torch.cat(chunks).flatten(), minlength=router.num_experts).float()  # (E,)
        router.e_score_correction_bias += speed * torch.sign(load.mean() - load)
        imbalance.append(float(load.max() / load.mean()))
    return sum(imbalance) / max(len(imbalance), 1)


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], config) -> torch.Tensor:
    """Switch-style load-balancing loss of each layer on its own, averaged over layers.

    ``router_logits``: one (tokens, num_experts) tensor per layer. transformers'
    ``load_balancing_loss_func`` pools all layers into one token set, which lets
    one layer's overload cancel another's underload; applying it per layer does not.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    losses = [load_balancing_loss_func((logits,), config.num_local_experts, config.num_experts_per_tok)
              for logits in router_logits]
    return torch.stack(losses).mean()


def train_step(model, batch: torch.Tensor, optimizer, args: argparse.Namespace) -> tuple[float, float]:
    """One optimiser step on (batch, seq_len) ids; returns (lm loss, aux loss or 0)."""
    is_mixtral = args.arch == "mixtral"
    out = model(input_ids=batch, labels=batch, output_router_logits=is_mixtral, use_cache=False)
    loss, aux = out.loss, torch.zeros(())
    if is_mixtral:  # replace the pooled aux loss the model added with the per-layer one
        aux = per_layer_balance_loss(out.router_logits, model.config)
        loss = loss - args.aux_loss_coef * out.aux_loss + args.aux_loss_coef * aux
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item() - args.aux_loss_coef * aux.item(), aux.item()


def train(model, windows: torch.Tensor, args: argparse.Namespace) -> dict:
    """Trains until ``args.steps`` or ``args.minutes``; returns step count, losses and wall time."""
    model.train()
    optimizer = make_optimizer(model, args)
    batches = batch_indices(windows.shape[0], args.batch, args.seed)
    capture = RouterCapture(model) if args.arch == "deepseek" else None
    budget_s = args.minutes * 60 if args.minutes else math.inf
    history, ema, imbalance = [], None, 0.0
    start = time.monotonic()
    bar = tqdm(total=args.steps, desc=f"train {args.arch}", mininterval=5)
    step = 0
    with capture or contextlib.nullcontext():
        while True:
            progress = max(step / args.steps, (time.monotonic() - start) / budget_s)
            if progress >= 1.0:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, progress, args)
            lm, aux = train_step(model, windows[next(batches)], optimizer, args)  # (batch, seq_len) ids
            if capture:
                imbalance = update_correction_bias(capture, args.bias_update_speed)
            history.append(lm)
            ema = lm if ema is None else 0.98 * ema + 0.02 * lm
            step += 1
            bar.update(1)
            balance = f"aux {aux:.3f}" if capture is None else f"max/mean load {imbalance:.2f}"
            bar.set_postfix_str(f"loss {ema:.3f}, {balance}, lr {optimizer.param_groups[0]['lr']:.2e}")
            if step % args.log_every == 0:
                bar.write(f"step {step} loss {ema:.4f} {balance} elapsed {time.monotonic() - start:.0f}s")
    bar.close()
    tail = history[-50:]
    return {
        "steps": step,
        "stopped_by": "steps" if step >= args.steps else "time cap",
        "train_seconds": time.monotonic() - start,
        "tokens_seen": step * args.batch * args.seq_len,
        "final_train_loss": sum(tail) / len(tail),
    }


# ----------------------------------------------------------------------------- evaluation

def shuffle_tokens(windows: torch.Tensor, seed: int) -> torch.Tensor:
    """Each window's tokens in a seeded random order (same multiset): (n, T) -> (n, T)."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(windows.shape, generator=gen)  # (n, T)
    return windows.gather(1, keys.argsort(dim=1))


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, batch: int) -> float:
    """Token-weighted mean next-token loss over (n, T) windows."""
    model.eval()
    total = 0.0
    for start in range(0, windows.shape[0], batch):
        chunk = windows[start : start + batch]  # (b, T)
        total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * chunk.shape[0]
    return total / windows.shape[0]


def evaluate(model, heldout: torch.Tensor, args: argparse.Namespace) -> dict:
    """Held-out loss of ``model`` on (n, T) windows and on the same tokens shuffled."""
    held = mean_loss(model, heldout, args.batch)
    shuffled = mean_loss(model, shuffle_tokens(heldout, args.seed), args.batch)
    return {"heldout_loss": held, "heldout_shuffled_loss": shuffled, "heldout_tokens": heldout.numel()}


# ----------------------------------------------------------------------------- saving

def save_checkpoint(model, tokenizer, out: Path) -> None:
    """Saves bf16 safetensors weights, config and tokenizer into ``out``."""
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def file_sizes(out: Path) -> dict[str, int]:
    """{file name: bytes} of the saved checkpoint files (weights, config, tokenizer)."""
    skip = {"README.md", "training.json"}
    return {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name not in skip}


def architecture_lines(config) -> list[str]:
    """Model-card bullet lines describing the architecture."""
    common = (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
              f"{config.num_attention_heads} attention heads, vocab {config.vocab_size}, "
              f"max positions {config.max_position_embeddings}")
    if config.model_type == "mixtral":
        return [f"- `MixtralForCausalLM`: {common}, {config.num_key_value_heads} KV heads",
                f"- every layer MoE: {config.num_local_experts} experts, top-{config.num_experts_per_tok}, "
                f"expert intermediate size {config.intermediate_size}"]
    q = "no q LoRA" if config.q_lora_rank is None else f"q_lora_rank {config.q_lora_rank}"
    return [f"- `DeepseekV3ForCausalLM`: {common}",
            f"- MLA attention: {q}, kv_lora_rank {config.kv_lora_rank}, qk_nope_head_dim "
            f"{config.qk_nope_head_dim}, qk_rope_head_dim {config.qk_rope_head_dim}, v_head_dim {config.v_head_dim}",
            f"- layer 0 dense (intermediate {config.intermediate_size}); layers 1-{config.num_hidden_layers - 1} MoE: "
            f"{config.n_routed_experts} routed experts (intermediate {config.moe_intermediate_size}), "
            f"top-{config.num_experts_per_tok}, {config.n_shared_experts} shared expert, "
            f"n_group {config.n_group} / topk_group {config.topk_group}, sigmoid scores, "
            f"routed_scaling_factor {config.routed_scaling_factor}"]


def balancing_line(args: argparse.Namespace) -> str:
    """Model-card sentence on how expert load was balanced."""
    if args.arch == "mixtral":
        return (f"Switch-style load-balancing auxiliary loss on the router logits of `MixtralForCausalLM` "
                f"(`output_router_logits=True`), weight `router_aux_loss_coef={args.aux_loss_coef}`, computed "
                "for each layer separately with transformers' `load_balancing_loss_func` and averaged over layers "
                "(the model's built-in version pools all layers, so one layer's overload can hide another's "
                "underload).")
    return (f"auxiliary-loss-free balancing as in DeepSeek-V3: after every step each router's "
            f"`e_score_correction_bias` moves by {args.bias_update_speed} towards under-loaded experts "
            f"(`bias += speed * sign(mean_load - load)`); no auxiliary loss.")


def model_card(name: str, config, info: dict, args: argparse.Namespace) -> str:
    """README.md text for the checkpoint directory."""
    run, ev, rs = info["training"], info["eval"], info["routing"]
    return "\n".join([
        f"# {name}",
        "",
        f"A tiny {config.model_type} Mixture-of-Experts language model trained from scratch on the Python "
        "standard library, shipped with moe-offload for tests and examples. It completes Python-like "
        "code; it is not a useful assistant.",
        "",
        "## Architecture",
        "",
        *architecture_lines(config),
        f"- {info['parameters']:,} parameters, stored in bf16 (`model.safetensors`, "
        f"{info['files']['model.safetensors']:,} bytes)",
        f"- tokenizer: byte-level BPE, {config.vocab_size} tokens, a newline and its indentation pre-split "
        f"as one piece, `{BOS}` prepended, `{EOS}` after each file",
        "",
        "## Training",
        "",
        f"- corpus: `*.py` files of the Python {info['python']} standard library, sorted by path, without "
        "site-packages, test directories, `encodings/` and `pydoc_data/`; every "
        f"{args.holdout_every}th file held out ({info['corpus']['train_files']} train files, "
        f"{info['corpus']['heldout_files']} held out, {info['corpus']['train_tokens']:,} train tokens)",
        f"- {run['steps']} steps of {args.batch} x {args.seq_len} tokens = {run['tokens_seen']:,} tokens seen "
        f"(stopped by {run['stopped_by']})",
        f"- AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), lr {args.lr}, {args.warmup} warmup steps, "
        f"cosine to {args.min_lr_ratio}x, grad clip {args.grad_clip}, seed {args.seed}",
        f"- load balancing: {balancing_line(args)}",
        f"- wall time: {run['train_seconds'] / 60:.1f} min training, {info['total_seconds'] / 60:.1f} min in all, "
        f"on {info['machine'].get('cpu_model') or info['machine']['processor']}, {args.threads} threads, no GPU",
        "",
        "## Results",
        "",
        f"- final train loss (mean of the last 50 steps): {run['final_train_loss']:.3f} nats/token",
        f"- held-out loss of the saved bf16 weights (computed in fp32): {ev['heldout_loss']:.3f} nats/token on "
        f"{ev['heldout_tokens']:,} tokens; the same tokens shuffled: {ev['heldout_shuffled_loss']:.3f}",
        "",
        f"## Routing on held-out text ({rs['layers'][next(iter(rs['layers']))]['tokens']:,} tokens)",
        "",
        "Usage entropy is in nats (max ln E for even use). Repeat share: share of a token's top-k experts "
        "that the previous token selected at the same layer; references are uniform random routing (k/E) "
        "and independent routing with the observed usage. Same set: probability the whole top-k set repeats.",
        "",
        markdown_table(rs),
        "",
        "Reproduce: `python bench/train_tiny_moe.py " + " ".join(info["argv"]) + "`. A run that stops by "
        "step count is bit-identical for a given seed with `--threads 1`; with 2 threads float reductions may "
        "differ in the last bits, and a run that stops at the `--minutes` cap gets as many steps as the "
        "machine allows.",
        "",
    ])


def write_outputs(out: Path, model, info: dict, args: argparse.Namespace) -> None:
    """training.json and README.md into ``out``."""
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(out.name, model.config, info, args))


# ----------------------------------------------------------------------------- main

# A few steps of a 2-layer model on a slice of the corpus: every stage (tokenizer, training, balancing,
# saving, evaluation, routing statistics, model card) in seconds.
SMOKE = {"steps": 3, "minutes": 0.0, "batch": 2, "seq_len": 32, "warmup": 1, "vocab_size": 300,
         "max_train_chars": 100_000, "eval_tokens": 128, "routing_tokens": 128, "layers": 2, "max_positions": 64,
         "log_every": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("mixtral", "deepseek"), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=20.0, help="time cap on training (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--holdout-every", type=int, default=20)
    p.add_argument("--max-train-chars", type=int, default=None, help="cap on training text (default: all)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens evaluated")
    p.add_argument("--routing-tokens", type=int, default=32768, help="held-out tokens of the routing statistics")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=320, help="Mixtral expert / DeepSeek dense MLP width")
    p.add_argument("--moe-intermediate", type=int, default=64, help="DeepSeek routed/shared expert width")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="Mixtral KV heads")
    p.add_argument("--experts", type=int, default=None, help="routed experts (mixtral 8, deepseek 32)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (mixtral 2, deepseek 4)")
    p.add_argument("--n-group", type=int, default=4)
    p.add_argument("--topk-group", type=int, default=2)
    p.add_argument("--q-lora-rank", type=int, default=96)
    p.add_argument("--kv-lora-rank", type=int, default=64)
    p.add_argument("--qk-rope-head-dim", type=int, default=16)
    p.add_argument("--qk-nope-head-dim", type=int, default=32)
    p.add_argument("--v-head-dim", type=int, default=32)
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--aux-loss-coef", type=float, default=0.02, help="Mixtral router aux loss weight")
    p.add_argument("--bias-update-speed", type=float, default=1e-2, help="DeepSeek correction bias step")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    return parse_bench_args(p, argv, SMOKE, out_flag=False)


def prepare_data(args: argparse.Namespace):
    """(tokenizer, train windows (n, T), held-out windows (m, T), corpus counts)."""
    train_files, heldout_files = stdlib_split(args.holdout_every)
    train_texts = read_text(train_files, args.max_train_chars)
    tokenizer = train_tokenizer(train_texts, args.vocab_size, args.max_positions)
    train_windows = make_windows(encode_documents(tokenizer, train_texts), args.seq_len)
    heldout_windows = make_windows(encode_documents(tokenizer, read_text(heldout_files)), args.seq_len)
    heldout_windows = heldout_windows[: max(1, args.eval_tokens // args.seq_len)]
    corpus = {"root": str(stdlib_root()), "train_files": len(train_files), "heldout_files": len(heldout_files),
              "train_chars": sum(map(len, train_texts)), "train_tokens": train_windows.numel()}
    return tokenizer, train_windows, heldout_windows, corpus


def main(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    bench_run = BenchRun.start(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer, train_windows, heldout_windows, corpus = prepare_data(args)
    print(f"corpus: {corpus['train_files']} train files, {corpus['train_tokens']:,} train tokens, "
          f"{heldout_windows.numel():,} held-out tokens; vocab {len(tokenizer)}")
    torch.manual_seed(args.seed)
    model = build_model(args, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {parameters:,} parameters")
    run = train(model, train_windows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, tokenizer, args.out)
    # Evaluate the saved bf16 weights, upcast to fp32: exact weights, fast and precise CPU compute.
    shipped = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    ev = evaluate(shipped, heldout_windows, args)
    print(f"held-out loss {ev['heldout_loss']:.3f}, shuffled {ev['heldout_shuffled_loss']:.3f}")
    info = {
        "arch": args.arch, "parameters": parameters, "corpus": corpus, "training": run, "eval": ev,
        "routing": routing_stats(shipped, tokenizer, max_tokens=args.routing_tokens),
        "python": platform.python_version(), "torch": torch.__version__, "machine": bench_run.machine(),
        "argv": argv if argv is not None else [],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    info["total_seconds"] = time.monotonic() - started
    info["files"] = file_sizes(args.out)
    write_outputs(args.out, shipped, info, args)
    print(f"saved {args.out}: {info['files']}")
    return info


if __name__ == "__main__":
    import sys

    main(parse_args(), sys.argv[1:])
