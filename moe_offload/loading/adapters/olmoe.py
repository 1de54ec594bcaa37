"""OLMoE: 64 experts top-8, no shared expert."""

from .base import ModelAdapter

ADAPTER = ModelAdapter(model_type="olmoe", experts_class="OlmoeExperts", expert_size_field="intermediate_size")
