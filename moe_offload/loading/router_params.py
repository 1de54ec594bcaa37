"""RouterParams: what the predictors get, from a loaded offloaded model or from a ModelParts.

Router weights [E, H], the router's selection bias [E] (DeepSeek-V3) and each
MoE layer's pre-router norm weight [H], in MoE-layer order, plus how the family
scores and groups experts (its adapter). ``build_router_params`` reads them by
their names in the transformers module tree: a loaded model hands over its own
tensors (they stay where the model keeps them, the device), a ModelParts reads
just those tensors from the checkpoint onto the CPU (no expert tensor is read,
no host store is built). Predictors move or cast them as they need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from ..errors import MoEOffloadError
from ..predictor import RouterParams
from .adapters import ModelAdapter, adapter_for
from .parts import ModelParts, read_dense

__all__ = ["RouterParams", "RouterTensorNames", "build_router_params", "router_params", "router_tensor_names"]


@dataclass(frozen=True)
class RouterTensorNames:
    """Names in the module tree of one MoE layer's router tensors."""

    weight: str          # [E, H]
    bias: str | None     # [E] selection bias, or None
    norm: str            # [H] weight of the norm the router reads


def router_params(source: nn.Module | ModelParts) -> RouterParams:
    """Router tensors of every MoE layer of a model loaded with ``from_pretrained``, or of a ModelParts
    (read from its checkpoint without the experts)."""
    if isinstance(source, ModelParts):
        return _parts_router_params(source)
    offload = getattr(source, "offload", None)
    if offload is None:
        raise MoEOffloadError("router_params needs a model loaded with moe_offload.from_pretrained or a ModelParts")
    adapter = adapter_for(source.config)
    names = router_tensor_names(adapter, source, offload.router_tap.routers)
    return build_router_params(adapter, source.config, names, lambda name: _module_tensor(source, name).detach())


def build_router_params(adapter: ModelAdapter, config: PretrainedConfig, names: list[RouterTensorNames],
                        tensor: Callable[[str], torch.Tensor]) -> RouterParams:
    """RouterParams from each MoE layer's tensor ``names``, read with ``tensor(name)``."""
    num_groups, top_groups, rule = adapter.router_groups(config)
    return RouterParams(
        weights=[tensor(n.weight) for n in names],
        biases=[None if n.bias is None else tensor(n.bias) for n in names],
        norm_weights=[tensor(n.norm) for n in names],
        scoring=adapter.router_scoring,
        num_groups=num_groups,
        top_groups=top_groups,
        group_rule=rule,
        top_k=config.num_experts_per_tok,
    )


def router_tensor_names(adapter: ModelAdapter, model: nn.Module, routers: list[nn.Module]) -> list[RouterTensorNames]:
    """The router tensors' names of each of ``routers`` (modules of ``model``); the norm is the adapter's
    ``router_norm_attr`` of the decoder layer that holds the router."""
    modules = {id(m): name for name, m in model.named_modules()}
    names = []
    for router in routers:
        name = modules[id(router)]
        bias = None if adapter.router_bias_attr is None else f"{name}.{adapter.router_bias_attr}"
        norm = f"{_layer_prefix(name)}.{adapter.router_norm_attr}.weight"
        names.append(RouterTensorNames(f"{name}.weight", bias, norm))
    return names


def _layer_prefix(name: str) -> str:
    """'model.layers.3.mlp.gate' -> 'model.layers.3': the module path up to the first layer index."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if index is None:
        raise MoEOffloadError(f"cannot tell the decoder layer of router {name}")
    return ".".join(parts[: index + 1])


def _module_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name), leaf)


def _parts_router_params(parts: ModelParts) -> RouterParams:
    """From the checkpoint, tensor by tensor, in the dtype the loaded model would hold them."""
    adapter = parts.adapter
    disk = {adapter.memory_name(n): n for n in parts.checkpoint.tensors if adapter.expert_tensor(n) is None}

    def tensor(name: str) -> torch.Tensor:
        if name in disk:
            return read_dense(parts, disk[name], name)
        value = _module_tensor(parts.model, name)   # a buffer the skeleton computed (not in the checkpoint)
        if value.is_meta:
            raise MoEOffloadError(f"checkpoint {parts.directory} lacks tensor {name}; the checkpoint is incomplete")
        return value.detach()

    names = router_tensor_names(adapter, parts.model, parts.routers())
    return build_router_params(adapter, parts.hf_config, names, tensor)
