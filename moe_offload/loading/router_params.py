"""RouterParams of a loaded offloaded model: what the predictors get from the runtime.

Router weights [E, H], DeepSeek-V3's selection bias [E] and each MoE layer's
post-attention RMSNorm weight [H], in MoE-layer order, plus how the family
scores and groups experts. Tensors stay where the model keeps them (the
device); predictors move or cast them as they need.
"""

from __future__ import annotations

from torch import nn

from ..errors import MoEOffloadError
from ..predictor import RouterParams

__all__ = ["RouterParams", "router_params"]


def router_params(model: nn.Module) -> RouterParams:
    """Router tensors of every MoE layer of a model loaded with ``from_pretrained``."""
    offload = getattr(model, "offload", None)
    if offload is None:
        raise MoEOffloadError("router_params needs a model loaded with moe_offload.from_pretrained")
    tap = offload.router_tap
    layers = model.model.layers
    routers = tap.routers
    norms = [layers[i].post_attention_layernorm.weight.detach() for i in offload.moe_layers]
    num_groups, top_groups, rule = router_groups(routers[0])
    return RouterParams(
        weights=[tap.router_weight(i).detach() for i in range(len(routers))],
        biases=[None if (b := tap.router_bias(i)) is None else b.detach() for i in range(len(routers))],
        norm_weights=norms,
        scoring=tap.scoring,
        num_groups=num_groups,
        top_groups=top_groups,
        group_rule=rule,
        top_k=getattr(routers[0], "top_k", None),
    )


def router_groups(router: nn.Module) -> tuple[int, int, str]:
    """(num_groups, top_groups, group_rule) of a router: DeepSeek-V3 and V2's group-limited routing."""
    num_groups = getattr(router, "num_group", None) or 1
    top_groups = getattr(router, "topk_group", None) or num_groups
    if num_groups <= 1 or top_groups >= num_groups:
        return 1, 1, "none"
    if hasattr(router, "e_score_correction_bias"):
        return num_groups, top_groups, "top2_sum"                                   # DeepSeek-V3
    if getattr(router, "topk_method", None) == "group_limited_greedy":
        return num_groups, top_groups, "max"                                        # DeepSeek-V2
    return 1, 1, "none"
