"""Routing replay (benchmarks only): routers' choices replaced by expert ids from a trace.

Random-weight models route almost uniformly, which no real model does. Replay
keeps every kernel, copy and cache decision real but takes each token's
experts (and router scores) from a recorded or synthetic trace with the
model's expert count, so cache hit rates and copy volumes look like a trained
model's. Outputs are meaningless under replay: never use it outside bench/.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moe_offload.predictor import Trace
from moe_offload.predictor.synthetic import SyntheticTraceConfig, synthetic_trace


def find_routers(model: nn.Module) -> list[nn.Module]:
    """Each MoE block's router (``mlp.gate`` beside ``mlp.experts``), plain or offloaded model."""
    return [m.gate for name, m in model.named_modules() if hasattr(m, "gate") and hasattr(m, "experts")]


def model_trace(model: nn.Module, tokens: int, skew: float, repeat: float, cross_layer: float, seed: int) -> Trace:
    """A synthetic trace shaped like ``model``'s routing (layers, experts, top-k)."""
    routers = find_routers(model)
    cfg = SyntheticTraceConfig(tokens=tokens, layers=len(routers), experts=routers[0].weight.shape[0],
                               top_k=routers[0].top_k, skew=skew, repeat=repeat, cross_layer=cross_layer, seed=seed)
    return synthetic_trace(cfg)


class RoutingReplay:
    """Prepended forward hooks on every router; each call takes the next T tokens of the trace."""

    def __init__(self, model: nn.Module, trace: Trace):
        routers = find_routers(model)
        num_experts = routers[0].weight.shape[0]
        if trace.num_experts != num_experts or trace.top_k != routers[0].top_k:
            raise ValueError(f"trace has {trace.num_experts} experts top-{trace.top_k}; "
                             f"model has {num_experts} top-{routers[0].top_k}")
        self.ids = torch.from_numpy(trace.expert_ids.astype(np.int64))                  # [N, L, k]
        self.logits = torch.from_numpy(np.log(trace.router_probs.astype(np.float32) + 1e-9))  # [N, L, E]
        self.position = [0] * len(routers)
        self.handles = [r.register_forward_hook(self._hook(i), prepend=True) for i, r in enumerate(routers)]

    def _hook(self, layer: int):
        def hook(module: nn.Module, inputs: tuple, output: tuple) -> tuple:
            logits, weights, _ = output
            tokens = logits.shape[0]
            rows = (self.position[layer] + torch.arange(tokens)) % self.ids.shape[0]
            self.position[layer] += tokens
            trace_layer = layer % self.ids.shape[1]
            ids = self.ids[rows, trace_layer]                                        # [T, k]
            new_logits = self.logits[rows, trace_layer]                              # [T, E]
            top = new_logits.softmax(-1).gather(1, ids)
            top = top / top.sum(-1, keepdim=True)                                     # [T, k]
            device = logits.device
            return new_logits.to(device, logits.dtype), top.to(device, weights.dtype), ids.to(device)
        return hook

    def rewind(self) -> None:
        self.position = [0] * len(self.position)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
