"""Build a transformers model with parameters on the meta device and real buffers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..errors import MoEOffloadError
from .adapters import ModelAdapter


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside goes to the meta device; buffers stay real,
    so transformers computes rotary tables and other non-persistent buffers itself."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@dataclass(frozen=True)
class ExpertsSite:
    """Where one transformers experts module sits in the model."""

    name: str            # e.g. "model.layers.3.mlp.experts"
    parent: nn.Module
    attr: str
    module: nn.Module
    model_layer: int


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model with meta parameters, in ``dtype``. A ``quantization_config`` (block FP8, the only one the
    checkpoint layer lets through) is removed from ``config``, which becomes ``model.config``: the model
    holds the weights dequantized, so transformers must neither quantize it nor save or report it as
    quantized."""
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def find_experts(model: nn.Module, adapter: ModelAdapter) -> list[ExpertsSite]:
    """The routed-experts modules of the model, in layer order."""
    sites = []
    for name, module in model.named_modules():
        if type(module).__name__ != adapter.experts_class:
            continue
        parent_name, _, attr = name.rpartition(".")
        layer = [int(p) for p in parent_name.split(".") if p.isdigit()]
        if not layer:
            raise MoEOffloadError(f"cannot tell the layer of experts module {name}")
        sites.append(ExpertsSite(name, model.get_submodule(parent_name), attr, module, layer[0]))
    if not sites:
        raise MoEOffloadError(
            f"no {adapter.experts_class} modules found; this transformers version lays out "
            f"{adapter.model_type} differently from what moe-offload supports (transformers 5.x)"
        )
    return sorted(sites, key=lambda s: s.model_layer)
