"""Learned correction: per (layer, distance) linear maps from what layer l saw to layer l+d's router logits.

T = tokens, H = hidden size, E = experts per layer, k = experts per token, F = features of a source layer

Each MoE layer j contributes a block of features per token: its gate input [H]
("gate"), or the gate input, the chosen experts one-hot [E] and the router
scores [E] ("gate+routing", "layers"). The features of source layer l are
layer l's block, or for "layers" the blocks of layers l, l-1, ..., 0 in that
order. The map predicts layer l+d's router logits, which are ranked the way that
router ranks (softmax, or sigmoid + bias and group limits). Fitted by ridge
regression towards the cross-layer gate (``fit_correction.py``).

File (safetensors): ``weight.{l}.{d}`` [F, E] and ``bias.{l}.{d}`` [E] float32
per fitted (source layer, distance); metadata ``format``
("moe-offload-learned-correction"), ``version`` and ``meta`` (JSON: num_layers,
num_experts, feature_set, distances, lambdas, fit tokens, model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .base import Predictor
from .routing import RouterParams, selection_scores

FEATURE_SETS = ("gate", "gate+routing", "layers")
FILE_FORMAT = "moe-offload-learned-correction"
FILE_VERSION = 1
FILE_NAME = "learned-correction.safetensors"


class CorrectionFormatError(ValueError):
    """A file that is not a learned correction this code reads."""


def layer_block(feature_set: str, gate_input: Tensor, chosen: Tensor, probs: Tensor) -> Tensor:
    """[T, B] one layer's features: gate_input [T, H], then (unless "gate") chosen one-hot [T, E] and probs [T, E]."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature_set must be one of {FEATURE_SETS}, got {feature_set!r}")
    gate = gate_input.float()
    if feature_set == "gate":
        return gate
    one_hot = torch.zeros(probs.shape, dtype=gate.dtype, device=gate.device)             # [T, E]
    one_hot.scatter_(1, chosen.long().to(gate.device), 1.0)
    return torch.cat([gate, one_hot, probs.to(gate.device, gate.dtype)], dim=1)


def source_features(feature_set: str, blocks: list[Tensor]) -> Tensor:
    """[T, F] features of source layer l from the blocks of layers 0..l ([T, B] each)."""
    if feature_set == "layers":
        return torch.cat(blocks[::-1], dim=1)
    return blocks[-1]


@dataclass
class LearnedCorrection:
    maps: dict[tuple[int, int], tuple[Tensor, Tensor]]   # (source layer, distance) -> (weight [F, E], bias [E])
    num_layers: int
    num_experts: int
    feature_set: str = "layers"
    meta: dict = field(default_factory=dict)

    @property
    def max_distance(self) -> int:
        return max((d for _, d in self.maps), default=0)

    def logits(self, layer: int, distance: int, features: Tensor) -> Tensor:
        """[T, E] predicted logits of layer ``layer + distance`` from layer ``layer``'s features [T, F]."""
        if (layer, distance) not in self.maps:
            raise ValueError(f"the learned correction has no map from layer {layer} to {layer} + {distance}")
        weight, bias = self.maps[layer, distance]
        return features.to(weight.device, torch.float32) @ weight + bias

    def to(self, device: torch.device | str) -> "LearnedCorrection":
        maps = {key: (w.to(device, torch.float32), b.to(device, torch.float32)) for key, (w, b) in self.maps.items()}
        return LearnedCorrection(maps, self.num_layers, self.num_experts, self.feature_set, dict(self.meta))

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for (layer, distance), (weight, bias) in sorted(self.maps.items()):
            tensors[f"weight.{layer}.{distance}"] = weight.float().contiguous().cpu()
            tensors[f"bias.{layer}.{distance}"] = bias.float().contiguous().cpu()
        meta = dict(self.meta, num_layers=self.num_layers, num_experts=self.num_experts, feature_set=self.feature_set)
        save_file(tensors, str(path), metadata={"format": FILE_FORMAT, "version": str(FILE_VERSION),
                                                "meta": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LearnedCorrection":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (OSError, SafetensorError) as err:
            raise CorrectionFormatError(f"{path} is not a learned correction ({err})") from None
        if header.get("format") != FILE_FORMAT or header.get("version") != str(FILE_VERSION):
            raise CorrectionFormatError(f"{path} is {header.get('format')} version {header.get('version')}; "
                                        f"this code reads {FILE_FORMAT} version {FILE_VERSION}")
        meta = json.loads(header.get("meta", "{}"))
        maps = {}
        for name, weight in tensors.items():
            kind, layer, distance = name.split(".")
            if kind == "weight":
                maps[int(layer), int(distance)] = (weight, tensors[f"bias.{layer}.{distance}"])
        return cls(maps, meta.pop("num_layers"), meta.pop("num_experts"), meta.pop("feature_set"), meta)


def router_fingerprint(params: RouterParams) -> list[float]:
    """Per MoE layer, the sum of |router weight|: tells whether a correction was fitted for these routers."""
    return [float(w.detach().double().abs().sum()) for w in params.weights]


def check_fitted_for(correction: LearnedCorrection, params: RouterParams) -> None:
    """ValueError when ``correction`` was fitted for another model (other sizes or other router weights)."""
    if correction.num_layers != params.num_layers or correction.num_experts != params.num_experts:
        raise ValueError(f"learned correction for {correction.num_layers} layers x {correction.num_experts} experts "
                         f"does not fit a model with {params.num_layers} x {params.num_experts}")
    fitted = correction.meta.get("router_fingerprint")
    if fitted is None:
        return
    now = router_fingerprint(params)
    if any(abs(a - b) > 1e-4 * max(abs(a), 1.0) for a, b in zip(fitted, now)):
        raise ValueError("the learned correction was fitted for other router weights (the model changed); "
                         "refit it: moe-offload fit-predictor --model ...")


class LearnedCorrectionPredictor(Predictor):
    """Ranks layer l+d's experts by the fitted map's logits, scored like that layer's router.

    With the "layers" feature set every layer 0..l of the step must have been observed.
    """

    name = "learned"
    row_independent = True
    needs_gate_inputs = True

    def __init__(self, correction: LearnedCorrection, params: RouterParams):
        check_fitted_for(correction, params)
        super().__init__(params.num_layers, params.num_experts)
        device = params.weights[0].device
        self.correction = correction.to(device)
        self.params = params.to(device)                             # float32 where the router weights are
        self._blocks: list[Tensor] = []                             # this step's blocks of layers 0..l
        self._features: dict[int, Tensor] = {}                      # source layer -> [T, F]

    def reset(self) -> None:
        self._blocks.clear()
        self._features.clear()

    def observe(self, layer: int, gate_input: Tensor, chosen: Tensor, probs: Tensor) -> None:
        if layer == 0:
            self.reset()
        if layer != len(self._blocks):
            raise ValueError(f"observe layer {layer} after layers 0..{len(self._blocks) - 1}: observe them in order")
        self._blocks.append(layer_block(self.correction.feature_set, gate_input, chosen, probs))
        self._features[layer] = source_features(self.correction.feature_set, self._blocks)

    def predict(self, layer: int, distance: int) -> Tensor:
        target = self.check_target(layer, distance)
        logits = self.correction.logits(layer, distance, self._features[layer])       # [T, E]
        return selection_scores(self.params, target, logits)
