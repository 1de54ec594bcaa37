"""RouterTap: forward hooks on each MoE layer's router, feeding listeners."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

# T = tokens, H = hidden size, E = experts, k = experts per token
# listener(layer, gate_input [T, H], probs [T, E] float32, chosen [T, k])
Listener = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def router_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-expert scores the router ranks by: softmax (most families) or sigmoid (DeepSeek-V3)."""
    logits = logits.float()
    return torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)


class RouterTap:
    """Hooks every router once; listeners are added and removed freely."""

    def __init__(self, routers: list[nn.Module], scoring: str):
        self.scoring = scoring
        self.routers = routers
        self.listeners: list[Listener] = []
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers)]

    def _hook(self, layer: int):
        tap = weakref.ref(self)   # the router holds the hook: a strong reference would be a cycle

        def hook(module: nn.Module, inputs: tuple, output: tuple) -> None:
            self = tap()
            if self is None or not self.listeners:
                return
            hidden = inputs[0]
            gate_input = hidden.reshape(-1, hidden.shape[-1])           # [T, H]
            probs = router_scores(output[0], self.scoring)              # [T, E]
            chosen = output[2]                                          # [T, k]
            for listener in self.listeners:
                listener(layer, gate_input, probs, chosen)
        return hook

    def close(self) -> None:
        """Remove the hooks and the listeners."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.listeners = []

    def add(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def remove(self, listener: Listener) -> None:
        self.listeners.remove(listener)

    def router_weight(self, layer: int) -> torch.Tensor:
        """[E, H] router weight of MoE layer ``layer``."""
        return self.routers[layer].weight

    def router_bias(self, layer: int) -> torch.Tensor | None:
        """DeepSeek-V3's selection bias, or None."""
        return getattr(self.routers[layer], "e_score_correction_bias", None)
