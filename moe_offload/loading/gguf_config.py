"""The transformers config of a GGUF checkpoint, from llama.cpp's metadata keys.

One function per architecture llama.cpp writes for the MoE families moe-offload runs (key names as
llama.cpp's converter writes them; transformers' own GGUF integration maps the same keys for the
architectures it reads). Anything the file does not say is left at the config class's default.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from ..errors import MoEOffloadError

# llama.cpp architecture -> transformers model_type, for the MoE files it writes
MODEL_TYPES = {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe"}
# fields without which no model can be built (the rest may be absent: the config class's default applies)
REQUIRED = ("kv_lora_rank", "v_head_dim", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts_per_tok",
            "num_local_experts", "num_experts", "intermediate_size", "moe_intermediate_size")


def _common(ckpt) -> dict:
    """The keys every decoder shares: sizes, heads, norms, rope, vocabulary, special tokens."""
    f = ckpt.field
    tokens = f("tokenizer.ggml.tokens")
    config = {
        "hidden_size": f(".embedding_length"),
        "num_hidden_layers": f(".block_count"),
        "num_attention_heads": f(".attention.head_count"),
        "num_key_value_heads": f(".attention.head_count_kv", f(".attention.head_count")),
        "rms_norm_eps": f(".attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": f(".context_length", 4096),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(f(".rope.freq_base", 10000.0))},
        "vocab_size": f(".vocab_size", len(tokens) if tokens is not None else None),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in ckpt.stored,
        "bos_token_id": f("tokenizer.ggml.bos_token_id"),
        "eos_token_id": f("tokenizer.ggml.eos_token_id"),
        "pad_token_id": f("tokenizer.ggml.padding_token_id"),
        "experts": f(".expert_count"),
        "num_experts_per_tok": f(".expert_used_count"),
    }
    if f(".attention.key_length") is not None:
        config["head_dim"] = f(".attention.key_length")
    return config


def _expert_ffn(ckpt, c: dict, experts_field: str, **extra) -> dict:
    """Families whose config has one FFN width, the experts' (Mixtral, OLMoE)."""
    c[experts_field] = c.pop("experts")
    c["intermediate_size"] = ckpt.field(".expert_feed_forward_length", ckpt.field(".feed_forward_length"))
    return c | extra


def _qwen_moe(ckpt, c: dict, norm_default: bool) -> dict:
    f = ckpt.field
    c["num_experts"] = c.pop("experts")
    c["moe_intermediate_size"] = f(".expert_feed_forward_length")
    c["intermediate_size"] = f(".feed_forward_length", c["moe_intermediate_size"])
    c["norm_topk_prob"] = bool(f(".expert_weights_norm", norm_default))
    c["decoder_sparse_step"] = 1
    c["mlp_only_layers"] = [i for i in range(c["num_hidden_layers"]) if i not in ckpt.moe_layers]
    if f(".expert_shared_feed_forward_length") is not None:
        c["shared_expert_intermediate_size"] = f(".expert_shared_feed_forward_length")
    return c


def _deepseek(ckpt, c: dict) -> dict:
    """DeepSeek-V2/V3 (llama.cpp's deepseek2 for both): multi-head latent attention, shared experts, groups.
    V3 routes with sigmoid scores and a selection bias (the file's exp_probs_b tensors)."""
    f = ckpt.field
    v3 = f(".expert_gating_func") == 2 or any(n.endswith("exp_probs_b.bias") for n in ckpt.stored)
    rope = f(".rope.dimension_count")
    c.pop("head_dim", None)      # key_length is the absorbed MLA head (kv_lora_rank + rope), not transformers'
    c |= {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "n_routed_experts": c.pop("experts"),
        "num_key_value_heads": c["num_attention_heads"],     # llama.cpp writes MLA as one KV head
        "n_shared_experts": f(".expert_shared_count", 0),
        "moe_intermediate_size": f(".expert_feed_forward_length"),
        "intermediate_size": f(".feed_forward_length", f(".expert_feed_forward_length")),
        "first_k_dense_replace": f(".leading_dense_block_count", 0),
        "n_group": f(".expert_group_count", 1),
        "topk_group": f(".expert_group_used_count", 1),
        "routed_scaling_factor": float(f(".expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(f(".expert_weights_norm", False)),
        "kv_lora_rank": f(".attention.kv_lora_rank"),
        "q_lora_rank": f(".attention.q_lora_rank"),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": f(".attention.key_length_mla") - rope,
        "v_head_dim": f(".attention.value_length_mla"),
    }
    if not v3:
        c["topk_method"] = "group_limited_greedy" if c["n_group"] > 1 else "greedy"
    if f(".rope.scaling.type") == "yarn":
        c["rope_parameters"] |= {
            "rope_type": "yarn", "factor": float(f(".rope.scaling.factor")),
            "original_max_position_embeddings": f(".rope.scaling.original_context_length"),
            "mscale_all_dim": float(f(".rope.scaling.yarn_log_multiplier", 0.0)) * 10}
    return c


_BUILDERS = {
    "llama": lambda ckpt, c: _expert_ffn(ckpt, c, "num_local_experts", sliding_window=None),
    "qwen2moe": lambda ckpt, c: _qwen_moe(ckpt, c, norm_default=False),
    "qwen3moe": lambda ckpt, c: _qwen_moe(ckpt, c, norm_default=True),
    "deepseek2": _deepseek,
    "olmoe": lambda ckpt, c: _expert_ffn(ckpt, c, "num_experts",
                                         norm_topk_prob=bool(ckpt.field(".expert_weights_norm", False))),
}


def gguf_config(ckpt) -> PretrainedConfig:
    """The transformers config of ``ckpt`` (a GGUFCheckpoint); MoEOffloadError naming the architecture or
    the field when the file is not an MoE model moe-offload runs."""
    arch = ckpt.architecture
    if arch not in _BUILDERS:
        raise MoEOffloadError(f"{ckpt.path}: GGUF architecture {arch!r} is not read; moe-offload reads the MoE "
                              f"architectures {', '.join(sorted(_BUILDERS))} (llama: Mixtral)")
    if not ckpt.moe_layers or not ckpt.field(".expert_count"):
        raise MoEOffloadError(f"{ckpt.path}: a GGUF of a dense {arch} model (no {arch}.expert_count, no "
                              "blk.N.ffn_gate_exps tensors); moe-offload runs Mixture-of-Experts models")
    fields = _BUILDERS[arch](ckpt, _common(ckpt))
    missing = [k for k, v in fields.items() if v is None and k in REQUIRED]
    if missing:
        raise MoEOffloadError(f"{ckpt.path}: metadata lacks what {', '.join(missing)} is read from (keys "
                              f"{arch}.*); the file is incomplete")
    fields = {k: v for k, v in fields.items() if v is not None or k in ("sliding_window", "q_lora_rank")}
    model_type = fields.pop("model_type", MODEL_TYPES.get(arch))
    return AutoConfig.for_model(model_type, **fields, dtype="float32")
