"""DeepSeek-V2 and V3: shared experts, first dense layers, grouped routing, MLA attention."""

from dataclasses import dataclass

from transformers import PretrainedConfig

from .base import NO_GROUPS, ModelAdapter


@dataclass(frozen=True)
class DeepseekAdapter(ModelAdapter):
    """Group-limited routing from config.json's n_group / topk_group; transformers caches MLA keys and values
    decompressed, per head."""

    group_rule: str = "max"                  # how a group is scored: its best expert (V2), its best two (V3)
    group_method: str | None = "group_limited_greedy"   # config topk_method that turns groups on; None: always

    def groups_experts(self, config: PretrainedConfig) -> bool:
        return self.group_method is None or getattr(config, "topk_method", None) == self.group_method

    def router_groups(self, config: PretrainedConfig) -> tuple[int, int, str]:
        if not self.groups_experts(config):
            return NO_GROUPS
        num_groups = getattr(config, "n_group", None) or 1
        top_groups = getattr(config, "topk_group", None) or num_groups
        if num_groups <= 1 or top_groups >= num_groups:
            return NO_GROUPS
        return num_groups, top_groups, self.group_rule

    def kv_bytes_per_token(self, config: PretrainedConfig, element_size: int) -> int:
        """Multi-head latent attention: transformers caches each layer's compressed latent (``kv_lora_rank``)
        and its rotary key part (``qk_rope_head_dim``) as one head, not the expanded keys and values."""
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_hidden_layers * per_layer * element_size


DEEPSEEK_V2 = DeepseekAdapter(model_type="deepseek_v2", experts_class="DeepseekV2Experts",
                              experts_field="n_routed_experts")
DEEPSEEK_V3 = DeepseekAdapter(model_type="deepseek_v3", experts_class="DeepseekV3Experts", router_scoring="sigmoid",
                              experts_field="n_routed_experts", router_bias_attr="e_score_correction_bias",
                              group_rule="top2_sum", group_method=None)
