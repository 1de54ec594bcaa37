"""The parity reference for GGUF checkpoints: transformers running the file's own dequantized weights.

transformers' ``gguf_file=`` loading does not read these MoE files whole (its config mapping has no
expert width for qwen2moe/qwen3moe, and no Mixtral, OLMoE or DeepSeek-V2 at all), so the reference is
built from its pieces: a transformers model of the file's config, every tensor dequantized by the
``gguf`` package (``gguf.quants.dequantize``), named and un-permuted by transformers' own GGUF tensor
mapping (``get_gguf_hf_weights_map`` and its tensor processors: llama's q/k un-permutation, the stacked
experts' gate/up fusion), none of moe-offload's reading code involved except the config.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

_EXPERTS = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight")
_KV_B_HALF = re.compile(r"blk\.\d+\.attn_[kv]_b\.weight")


def gguf_reference(path: Path, dtype: torch.dtype = torch.float32):
    """A plain transformers model (eager experts, ``dtype``) holding ``path``'s dequantized weights."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        Qwen2MoeTensorProcessor,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    from moe_offload.loading.gguf_checkpoint import GGUFCheckpoint
    from moe_offload.loading.gguf_config import gguf_config

    config = gguf_config(GGUFCheckpoint(Path(path)))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager").eval()
    reader = GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    dense = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    experts = Qwen2MoeTensorProcessor(config=config.to_dict())
    dense_names = get_gguf_hf_weights_map(model, dense, model_type=arch)
    expert_names = get_gguf_hf_weights_map(model, experts, model_type=arch)
    parsed = {"tensors": {}}
    halves = {}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        if _KV_B_HALF.fullmatch(tensor.name):     # DeepSeek's kv_b_proj, split by llama.cpp: put together below
            halves[tensor.name] = torch.from_numpy(np.copy(weights))
            continue
        if tensor.name.endswith(".exp_probs_b.bias"):   # DeepSeek-V3's router bias: no entry in the map
            layer = tensor.name.split(".")[1]
            dense_names[tensor.name] = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        if _EXPERTS.fullmatch(tensor.name):
            experts.process(weights=weights, name=tensor.name, tensor_key_mapping=expert_names,
                            parsed_parameters=parsed)
            continue
        result = dense.process(weights=weights, name=tensor.name, tensor_key_mapping=dense_names,
                               parsed_parameters=parsed)
        parsed["tensors"][dense_names[result.name]] = torch.from_numpy(np.copy(result.weights))
    for name, k_b in halves.items():
        if "attn_k_b" in name:
            v_b = halves[name.replace("attn_k_b", "attn_v_b")]                     # [heads, v, rank]
            layer = name.split(".")[1]
            kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)                    # [heads, nope + v, rank]
            parsed["tensors"][f"model.layers.{layer}.self_attn.kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
    state = model.state_dict()
    for name, value in parsed["tensors"].items():
        state[name] = value.reshape(state[name].shape).to(state[name].dtype)   # float32 values, cast once
    missing = set(model.state_dict()) - set(parsed["tensors"])
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    assert not missing, f"reference for {path} lacks {sorted(missing)}"
    model.load_state_dict(state)
    model.tie_weights()
    return model
