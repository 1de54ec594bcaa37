"""DeepSeek-V2 and V3: shared experts, first dense layers, grouped routing, MLA attention."""

from dataclasses import dataclass

from transformers import PretrainedConfig

from .base import ModelAdapter


@dataclass(frozen=True)
class DeepseekAdapter(ModelAdapter):
    """transformers caches MLA keys and values decompressed, per head."""

    def kv_bytes_per_token(self, config: PretrainedConfig, element_size: int) -> int:
        key = config.qk_nope_head_dim + config.qk_rope_head_dim
        per_layer = config.num_attention_heads * (key + config.v_head_dim)
        return config.num_hidden_layers * per_layer * element_size


DEEPSEEK_V2 = DeepseekAdapter(model_type="deepseek_v2", experts_class="DeepseekV2Experts",
                              experts_field="n_routed_experts")
DEEPSEEK_V3 = DeepseekAdapter(model_type="deepseek_v3", experts_class="DeepseekV3Experts", router_scoring="sigmoid",
                              experts_field="n_routed_experts")
