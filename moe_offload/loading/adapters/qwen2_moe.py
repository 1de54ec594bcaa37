"""Qwen2-MoE: routed experts plus a sigmoid-gated shared expert (kept dense on the device)."""

from .base import ModelAdapter

ADAPTER = ModelAdapter(model_type="qwen2_moe", experts_class="Qwen2MoeExperts")
