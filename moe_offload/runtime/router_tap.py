"""RouterTap: forward hooks on each MoE layer's router, feeding listeners.

How a family's router reports its choice (scoring, where the logits and chosen
ids sit in its output, its bias attribute) comes from the loader, which reads
it off the model's adapter; the runtime knows no family.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# T = tokens, H = hidden size, E = experts, k = experts per token
# listener(layer, gate_input [T, H], probs [T, E] float32, chosen [T, k])
Listener = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
# a router module's forward output -> (logits [T, E], chosen expert ids [T, k])
RouterOutputs = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


def router_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-expert scores the router ranks by: softmax (most families) or sigmoid (DeepSeek-V3)."""
    logits = logits.float()
    return torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)


class RouterTap:
    """Hooks every router once; listeners are added and removed freely.

    ``scoring``: "softmax" or "sigmoid" (router_scores); ``outputs``: the
    family's reading of a router's output (the adapter's ``router_outputs``).
    """

    def __init__(self, routers: list[nn.Module], scoring: str, outputs: RouterOutputs):
        self.scoring = scoring
        self.outputs = outputs
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
            logits, chosen = self.outputs(output)                       # [T, E], [T, k]
            probs = router_scores(logits, self.scoring)                 # [T, E]
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
