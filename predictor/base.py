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
from collections.abc import Callable

from torch import Tensor

# f(layer, distance) -> [T, E]: one sequence's scores for all its tokens (see Predictor.whole_sequence).
SequenceScores = Callable[[int, int], Tensor]


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

    def whole_sequence(self, gates: Tensor, ids: Tensor, probs: Tensor) -> SequenceScores | None:
        """The scores a token-by-token walk of one sequence gets, for all of its tokens at once.

        ``gates`` [T, L, H], ``ids`` [T, L, k], ``probs`` [T, L, E] are the sequence's observations. The result
        ``f(layer, distance)`` is [T, E]: row t equals what ``predict(layer, distance)`` returns right after
        token t's layer ``layer`` was observed, starting from ``reset()``, one token per step. None (the
        default) when the predictor has no such shortcut; evaluation then walks token by token.
        """
        return None

    def check_target(self, layer: int, distance: int) -> int:
        """The target layer ``layer + distance``, or ValueError when it does not exist."""
        target = layer + distance
        if distance < 1 or target >= self.num_layers:
            raise ValueError(f"cannot predict layer {layer} + {distance}: the model has {self.num_layers} MoE layers")
        return target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, layers={self.num_layers}, experts={self.num_experts})"
