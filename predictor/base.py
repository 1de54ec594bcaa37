"""Predictor: the one interface every expert predictor implements.

T = tokens in the current step (prompt length at prefill, 1 at decode),
H = hidden size, E = experts per layer, k = experts per token

The runtime calls, per MoE layer ``l`` of each forward step, right after the
layer's router ran:

    predictor.observe(l, gate_input, chosen, probs)
    scores = predictor.predict(l, d)       # for layers l+1 .. l+depth

``predict(l, d)`` scores the experts of layer ``l + d`` for the same T tokens
using only what has been observed so far: layers <= l of this step and all of
earlier steps. ``reset()`` starts a new sequence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class Predictor(ABC):
    name: str = "predictor"
    # True when each row's prediction depends only on that row's own observations,
    # so a whole sequence can be fed as one step (evaluation uses this to go faster).
    row_independent: bool = False
    needs_gate_inputs: bool = False   # True when observe() uses the gate input (traces need gate_inputs)

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers = num_layers
        self.num_experts = num_experts

    def reset(self) -> None:
        """Forget the current sequence."""

    @abstractmethod
    def observe(self, layer: int, gate_input: Tensor, chosen: Tensor, probs: Tensor) -> None:
        """Layer ``layer``'s router ran: gate_input [T, H], chosen [T, k], probs [T, E]."""

    @abstractmethod
    def predict(self, layer: int, distance: int) -> Tensor:
        """[T, E] float scores for the experts of layer ``layer + distance``; higher = likelier."""

    def check_target(self, layer: int, distance: int) -> int:
        """The target layer ``layer + distance``, or ValueError when it does not exist."""
        target = layer + distance
        if distance < 1 or target >= self.num_layers:
            raise ValueError(f"cannot predict layer {layer} + {distance}: the model has {self.num_layers} MoE layers")
        return target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, layers={self.num_layers}, experts={self.num_experts})"
