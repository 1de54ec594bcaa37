"""Tiny random checkpoints of every supported family, written by save_pretrained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=3, max_position_embeddings=128, initializer_range=0.2,
               tie_word_embeddings=False)

# Each family exercises what makes it different: dense + MoE layers, shared experts,
# grouped routing, unnormalised top-k, routed scaling factors.
FAMILIES: dict[str, dict] = {
    "mixtral": dict(model_type="mixtral", intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                      num_experts_per_tok=2, shared_expert_intermediate_size=40, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0],
                      head_dim=8),
    "deepseek_v2": dict(model_type="deepseek_v2", intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0,
                        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        num_key_value_heads=4),
    "deepseek_v3": dict(model_type="deepseek_v3", intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
                        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, kv_lora_rank=16,
                        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        num_key_value_heads=4),
    "olmoe": dict(model_type="olmoe", intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=False),
}


def num_experts(family: str) -> int:
    spec = FAMILIES[family]
    return spec.get("num_local_experts") or spec.get("num_experts") or spec.get("n_routed_experts")


def make_checkpoint(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Write a random ``family`` checkpoint (float32) into ``directory``."""
    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **(_COMMON | spec | overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial weights everywhere, including router biases
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.normal_(0, 0.1)
    model.save_pretrained(directory)
    return directory


def add_char_tokenizer(directory: Path) -> Path:
    """A 96-entry character tokenizer (printable ASCII + <unk>) saved in HF format."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0} | {chr(c): c - 31 for c in range(32, 127)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(directory)
    return directory


# Block-FP8 checkpoints (DeepSeek-V3's format): float8_e4m3fn weights beside float32 `<name>_scale_inv`,
# one scale per (BO x BI) block. Embeddings, lm_head, norms, routers and biases stay unquantized.
FP8_MAX = 448.0                       # largest finite float8_e4m3fn
_FP8_KEEP = re.compile(r"embed_tokens|lm_head|norm|\.gate\.weight$|shared_expert_gate")
_PER_EXPERT = re.compile(r"(?P<base>model\.layers\.\d+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight")


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[..., O, I] zero-padded to whole blocks, as [..., O/BO, BO, I/BI, BI]."""
    out, inp = w.shape[-2:]
    padded = torch.nn.functional.pad(w, (0, -inp % block[1], 0, -out % block[0]))
    return padded.unflatten(-2, (-1, block[0])).unflatten(-1, (-1, block[1]))


def _unblock(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of _blocks: back to [..., O, I], the padding dropped."""
    full = blocks.flatten(-2, -1).flatten(-3, -2)
    return full[..., : shape[-2], : shape[-1]].contiguous()


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [..., O, I], scale_inv float32 [..., ceil(O/BO), ceil(I/BI)]), scale = amax / 448."""
    blocks = _blocks(w.float(), block)
    scale_inv = (blocks.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale_inv[..., :, None, :, None]).to(torch.float8_e4m3fn)
    return _unblock(q, w.shape), scale_inv


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The slow reference: every block's fp8 values times its scale, in float32."""
    blocks = _blocks(q.float(), block) * scale_inv[..., :, None, :, None]
    return _unblock(blocks, q.shape)


def _fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert mlp.experts.<e>.{gate,up,down}_proj.weight -> fused gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    per: dict[str, dict] = {}
    rest = {}
    for name, t in tensors.items():
        m = _PER_EXPERT.fullmatch(name)
        if m:
            per.setdefault(m["base"], {})[(m["proj"], int(m["e"]))] = t
        else:
            rest[name] = t
    for base, parts in per.items():
        experts = range(1 + max(e for _, e in parts))
        rest[f"{base}.gate_up_proj"] = torch.stack([torch.cat([parts["gate", e], parts["up", e]]) for e in experts])
        rest[f"{base}.down_proj"] = torch.stack([parts["down", e] for e in experts])
    return rest


def make_fp8_checkpoint(source: Path, directory: Path, block: tuple[int, int] = (16, 16), fused: bool = False,
                        skip: tuple[str, ...] = (), dtype: str | None = None) -> Path:
    """Convert make_checkpoint's ``source`` into block FP8 in ``directory``: every linear weight (2-D, or
    fused experts 3-D when ``fused``) except those of ``skip`` (written as modules_to_not_convert) becomes
    float8_e4m3fn + scale_inv; the rest is stored in ``dtype`` (default: the source's)."""
    from safetensors.torch import load_file, save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    dtype = dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
    tensors = load_file(source / "model.safetensors")
    tensors = _fuse_experts(tensors) if fused else tensors
    out = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if t.dim() in (2, 3) and not _FP8_KEEP.search(name) and not any(module.endswith(s) for s in skip):
            out[name], out[name + "_scale_inv"] = quantize_fp8(t, block)
        else:
            out[name] = t.to(getattr(torch, dtype))
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    config |= {"dtype": dtype, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
        **({"modules_to_not_convert": list(skip)} if skip else {})}}
    config.pop("torch_dtype", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def dequantized_checkpoint(fp8_dir: Path, directory: Path, scales: bool = True) -> Path:
    """The plain float32 checkpoint transformers runs as the reference for ``fp8_dir``: each fp8 weight
    replaced by dequantize_fp8 of it (``scales=False``: its fp8 values cast to float32 with the scales
    ignored, what a reader that knows no block FP8 computes), config.json without quantization_config."""
    from safetensors.torch import load_file, save_file

    stored = load_file(fp8_dir / "model.safetensors")
    out = {}
    for name, t in stored.items():
        if name.endswith("_scale_inv"):
            continue
        scale = stored.get(name + "_scale_inv")
        out[name] = t.float() if scale is None or not scales else dequantize_fp8(t, scale, _block_of(fp8_dir))
    directory.mkdir(parents=True, exist_ok=True)
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config.pop("quantization_config")
    (directory / "config.json").write_text(json.dumps(config | {"dtype": "float32"}, indent=2))
    return directory


def _block_of(fp8_dir: Path) -> tuple[int, int]:
    config = json.loads((fp8_dir / "config.json").read_text())
    return tuple(config["quantization_config"]["weight_block_size"])
