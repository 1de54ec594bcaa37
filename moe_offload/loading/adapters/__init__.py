"""Per-family model adapters; adding a family is one file and one entry here."""

from transformers import PretrainedConfig

from ...errors import MoEOffloadError
from .base import ExpertTensorName, ModelAdapter
from .deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from .mixtral import ADAPTER as MIXTRAL
from .olmoe import ADAPTER as OLMOE
from .qwen2_moe import ADAPTER as QWEN2_MOE
from .qwen3_moe import ADAPTER as QWEN3_MOE

ADAPTERS: dict[str, ModelAdapter] = {
    a.model_type: a for a in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, DEEPSEEK_V2, DEEPSEEK_V3, OLMOE)
}


def adapter_for(config: PretrainedConfig) -> ModelAdapter:
    """The adapter of a transformers config, or MoEOffloadError naming the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise MoEOffloadError(
            f"model_type {model_type!r} is not supported; supported MoE families: "
            f"{', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "ExpertTensorName", "ModelAdapter", "adapter_for"]
