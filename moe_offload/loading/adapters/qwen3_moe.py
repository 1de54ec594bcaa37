"""Qwen3-MoE: routed experts only; dense layers listed in `mlp_only_layers`."""

from .base import ModelAdapter

ADAPTER = ModelAdapter(model_type="qwen3_moe", experts_class="Qwen3MoeExperts")
