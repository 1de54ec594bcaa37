"""Tiny random checkpoints of every supported family, written by save_pretrained."""

from __future__ import annotations

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
