"""Cross-layer gate (Fate, AdapMoE, Pre-gated MoE): layer l+d's router applied to layer l's gate input.

T = tokens, H = hidden size, E = experts per layer
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Predictor
from .routing import RouterParams, cross_layer_input, selection_scores


class CrossLayerGatePredictor(Predictor):
    """Scores layer l+d's experts with its own router on layer l's gate input.

    ``renorm=True`` first swaps the RMSNorm weight (``g_l / w_l * w_{l+d}``);
    ``renorm=False`` is the plain Fate gate. Scores are the target router's
    selection scores (sigmoid + bias and group limits for DeepSeek).
    """

    row_independent = True
    needs_gate_inputs = True

    def __init__(self, params: RouterParams, renorm: bool = True):
        super().__init__(params.num_layers, params.num_experts)
        self.params = params.to(params.weights[0].device)          # float32 where the router weights are
        self.renorm = renorm
        self.name = "cross_layer" if renorm else "cross_layer_raw"
        self._gate_inputs: dict[int, Tensor] = {}
        self._maps: dict[tuple[int, int], Tensor] = {}              # (layer, target) -> [H, E]

    def reset(self) -> None:
        self._gate_inputs.clear()

    def observe(self, layer: int, gate_input: Tensor, chosen: Tensor, probs: Tensor) -> None:
        self._gate_inputs[layer] = gate_input                                       # [T, H]

    def predict(self, layer: int, distance: int) -> Tensor:
        target = self.check_target(layer, distance)
        gate = self._gate_inputs[layer]
        logits = gate.to(self.params.weights[0].device, torch.float32) @ self.gate_map(layer, target)  # [T, E]
        return selection_scores(self.params, target, logits)

    def gate_map(self, layer: int, target: int) -> Tensor:
        """[H, E] linear map from layer ``layer``'s gate input to layer ``target``'s router logits."""
        key = (layer, target)
        if key not in self._maps:
            eye = torch.eye(self.params.hidden_size, device=self.params.weights[0].device)        # [H, H]
            swap = cross_layer_input(self.params, layer, target, eye, self.renorm)              # [H, H] diagonal
            self._maps[key] = swap @ self.params.weights[target].T                              # [H, E]
        return self._maps[key]
