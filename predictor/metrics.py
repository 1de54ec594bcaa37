"""Prediction accuracy: how many of the truly selected experts a predictor's top candidates cover.

T = tokens, E = experts per layer, k = experts per token, L = MoE layers, m = candidates kept

recall       = share of the truly selected experts found among the predictor's top k
recall_at_2k = the same among its top 2k (a prefetch of 2k experts per token)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import Tensor


def topk_hits(scores: Tensor, chosen: Tensor, m: int) -> Tensor:
    """[T] how many of the true experts ``chosen`` [T, k] are among the top ``m`` of ``scores`` [T, E]."""
    m = min(m, scores.shape[1])
    top = scores.float().topk(m, dim=1).indices                                # [T, m]
    return (top.unsqueeze(1) == chosen.long().unsqueeze(2)).any(dim=2).sum(dim=1)  # [T]


def recall(scores: Tensor, chosen: Tensor, m: int | None = None) -> float:
    """Share of the true experts [T, k] found in the top ``m`` (default k) of ``scores`` [T, E]."""
    k = chosen.shape[1]
    if chosen.shape[0] == 0:
        return float("nan")
    return float(topk_hits(scores, chosen, k if m is None else m).sum()) / chosen.numel()


@dataclass
class RecallCounter:
    """Accumulates top-k and top-2k hits per target layer for one (predictor, distance)."""

    num_layers: int
    top_k: int
    hits: np.ndarray = field(init=False)          # [L] true experts found in the top k
    hits_2k: np.ndarray = field(init=False)       # [L] true experts found in the top 2k
    truths: np.ndarray = field(init=False)        # [L] true experts seen

    def __post_init__(self) -> None:
        self.hits = np.zeros(self.num_layers, np.int64)
        self.hits_2k = np.zeros(self.num_layers, np.int64)
        self.truths = np.zeros(self.num_layers, np.int64)

    def add(self, target: int, scores: Tensor, chosen: Tensor) -> None:
        """Scores [T, E] for layer ``target`` against its true experts ``chosen`` [T, k]."""
        self.hits[target] += int(topk_hits(scores, chosen, self.top_k).sum())
        self.hits_2k[target] += int(topk_hits(scores, chosen, 2 * self.top_k).sum())
        self.truths[target] += chosen.numel()

    @property
    def recall(self) -> float:
        return _share(self.hits.sum(), self.truths.sum())

    @property
    def recall_at_2k(self) -> float:
        return _share(self.hits_2k.sum(), self.truths.sum())

    @property
    def per_layer_recall(self) -> list[float | None]:
        """Recall per target layer; None for layers nothing predicted (those closer than the distance)."""
        return [None if t == 0 else float(h) / float(t) for h, t in zip(self.hits, self.truths)]

    @property
    def per_layer_recall_at_2k(self) -> list[float | None]:
        return [None if t == 0 else float(h) / float(t) for h, t in zip(self.hits_2k, self.truths)]


def _share(hits: int, truths: int) -> float:
    return float(hits) / float(truths) if truths else float("nan")


def chance_recall(num_experts: int, m: int) -> float:
    """Expected recall of ``m`` experts drawn at random out of ``num_experts``."""
    return min(m, num_experts) / num_experts
