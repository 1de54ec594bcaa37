"""RouterParams and the routing math predictors need: logits, cross-layer inputs, selection scores.

T = tokens, H = hidden size, E = experts per layer, L = MoE layers, G = expert groups

A router scores experts from its gate input ``g_l = w_l * h / rms(h)`` (the
layer's post-attention RMSNorm, weight ``w_l``): ``logits = g_l @ W_l.T``. It
picks the top-k of its *selection scores*: the logits for softmax routers;
``sigmoid(logits) + bias`` for DeepSeek-V3; in both cases only inside the best
``top_groups`` of ``num_groups`` expert groups when the family limits groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCORINGS = ("softmax", "sigmoid")
GROUP_RULES = ("none", "max", "top2_sum")  # none; DeepSeek-V2 group_limited_greedy; DeepSeek-V3

@dataclass(frozen=True)
class RouterParams:
    """Router tensors of every MoE layer, as the runtime hands them to predictors."""

    weights: list[Tensor]               # L x [E, H] router weights
    biases: list[Tensor | None]         # L x [E] selection bias (DeepSeek-V3 e_score_correction_bias) or None
    norm_weights: list[Tensor]          # L x [H] post_attention_layernorm weight of the MoE layer
    scoring: str = "softmax"            # "softmax" or "sigmoid"
    num_groups: int = 1                 # expert groups (DeepSeek n_group)
    top_groups: int = 1                 # groups a token may use (DeepSeek topk_group)
    group_rule: str = "none"            # how a group is scored: "none", "max" (V2), "top2_sum" (V3)
    top_k: int | None = None            # experts per token; with group limits it orders the rest (see selection_scores)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.group_rule not in GROUP_RULES:
            raise ValueError(f"group_rule must be one of {GROUP_RULES}, got {self.group_rule!r}")
        if not (len(self.weights) == len(self.biases) == len(self.norm_weights)):
            raise ValueError("weights, biases and norm_weights need one entry per MoE layer")

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    @property
    def num_experts(self) -> int:
        return self.weights[0].shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weights[0].shape[1]

    @property
    def limits_groups(self) -> bool:
        return self.group_rule != "none" and self.top_groups < self.num_groups

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "RouterParams":
        """A copy with every tensor on ``device`` in ``dtype`` (float32 by default)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(device=device, dtype=dtype)

        return RouterParams([move(w) for w in self.weights], [move(b) for b in self.biases],
                            [move(n) for n in self.norm_weights], self.scoring, self.num_groups,
                            self.top_groups, self.group_rule, self.top_k)


def router_logits(params: RouterParams, layer: int, gate_input: Tensor) -> Tensor:
    """[T, E] logits of ``layer``'s router for gate inputs [T, H] (float32)."""
    weight = params.weights[layer]
    return gate_input.to(weight.device, torch.float32) @ weight.float().T


def cross_layer_input(params: RouterParams, source: int, target: int, gate_input: Tensor,
                      renorm: bool = True) -> Tensor:
    """[T, H] stand-in for layer ``target``'s gate input, made from layer ``source``'s [T, H].

    ``renorm`` swaps the RMSNorm weight: ``g / w_source * w_target`` (the
    target layer's norm applied to the source layer's hidden state); without
    it the source gate input is used as is.
    """
    x = gate_input.float()
    if not renorm or source == target:
        return x
    w_source = params.norm_weights[source].float()
    w_target = params.norm_weights[target].float()
    safe = torch.where(w_source.abs() < 1e-6, torch.full_like(w_source, 1e-6), w_source)  # [H]
    return x / safe * w_target


def selection_scores(params: RouterParams, layer: int, logits: Tensor) -> Tensor:
    """[T, E] scores whose top-k is the router's choice for ``logits`` [T, E]; higher = likelier.

    Softmax routers: the router probabilities. Sigmoid routers: ``sigmoid(logits) + bias``.
    With group-limited routing the experts the router would pick (top-k inside the
    token's best groups) are raised above all others, and the rest keep their
    order by score regardless of group: a prediction's groups are uncertain, so
    beyond the first k this ranks the true experts higher. Without ``top_k`` the
    experts outside the token's groups are lowered below every expert inside them.
    """
    logits = logits.float()
    if params.scoring == "sigmoid":
        scores = torch.sigmoid(logits)
        bias = params.biases[layer]
        if bias is not None:
            scores = scores + bias.to(scores.device, torch.float32)
    else:
        scores = torch.softmax(logits, dim=-1)
    if not params.limits_groups:
        return scores
    penalty = outside_group_penalty(params, layer, scores.device)
    grouped = scores - penalty * ~group_mask(params, scores)                       # [T, E]
    if not params.top_k:
        return grouped
    choice = grouped.topk(params.top_k, dim=-1).indices                            # [T, k]
    return scores.scatter_add(1, choice, torch.zeros(choice.shape, device=scores.device) + penalty)


def outside_group_penalty(params: RouterParams, layer: int, device: torch.device) -> Tensor | float:
    """More than the spread of selection scores: sigmoid or softmax values span 1, the bias its range.

    A 0-d tensor where there is a bias, so no host sync on the device."""
    bias = params.biases[layer]
    return 1.001 if bias is None else 1.001 + (bias.max() - bias.min()).to(device, torch.float32)


def group_mask(params: RouterParams, scores: Tensor) -> Tensor:
    """[T, E] bool: experts inside the ``top_groups`` best groups of selection ``scores`` [T, E]
    (group score: the best expert's for DeepSeek-V2, the two best experts' sum for V3)."""
    t, e = scores.shape
    grouped = scores.view(t, params.num_groups, e // params.num_groups)     # [T, G, E/G]
    if params.group_rule == "max":
        group_score = grouped.max(dim=-1).values                            # [T, G]
    else:
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)            # [T, G]
    best = group_score.topk(params.top_groups, dim=-1).indices              # [T, top_groups]
    chosen = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
    return chosen.unsqueeze(-1).expand_as(grouped).reshape(t, e)
