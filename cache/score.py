"""ScorePolicy: HybriMoE's "minus recent score" cache, evicting the lowest router-score average."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .layout import ExpertLayout
from .policy import CachePolicy

# T = tokens of one router call, E = experts per layer, K = flat keys


class ScorePolicy(CachePolicy):
    """Per layer, at each router call with scores s [E]:

    - ``S <- alpha * s + (1 - alpha) * S`` for the ``top_p`` experts with the highest s,
    - ``S <- (1 - alpha) * S`` for every other expert of that layer;

    evict the candidate with the lowest S (ties: the smallest key). Scores are
    kept for every expert, resident or not. Defaults follow HybriMoE:
    alpha = 0.5, top_p = 2 * top_k.

    A call with several tokens (prefill) uses s = the mean router score over
    its tokens (HybriMoE takes the first token's; the mean weighs every token
    of the chunk the same and equals the token's scores for a one-token call).
    Without scores, s = 1 / len(chosen) on the chosen experts.

    ``hint(layer, scores)``: predicted scores [E] for the layer's next call (a
    predictor's output). Until that call, the layer's experts rank by
    max(S, predicted), which keeps experts predicted for the next call.
    """

    name = "score"
    wants_router_probs = True

    def __init__(self, layout: ExpertLayout, alpha: float = 0.5, top_p: int | None = None) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.experts = layout.experts_per_layer
        self.top_p = min(int(top_p or 2 * layout.top_k), self.experts)
        if self.top_p < 1:
            raise ValueError(f"top_p must be at least 1, got {top_p}")
        self.scores = np.zeros(layout.num_keys, dtype=np.float64)     # [K] S
        self._hints = np.zeros(layout.num_keys, dtype=np.float64)     # [K] predicted scores, 0 = none

    def observe(self, layer: int, chosen: Sequence[int], router_probs: np.ndarray | None = None) -> None:
        s = self._call_scores(chosen, router_probs)                   # [E]
        top = np.argsort(-s, kind="stable")[: self.top_p]             # [p] highest scores, ties by expert id
        base = layer * self.experts
        block = self.scores[base : base + self.experts]               # [E] view
        block *= 1.0 - self.alpha
        block[top] += self.alpha * s[top]
        self._hints[base : base + self.experts] = 0.0

    def hint(self, layer: int, scores: np.ndarray) -> None:
        base = layer * self.experts
        self._hints[base : base + self.experts] = np.asarray(scores, dtype=np.float64).reshape(self.experts)

    def _call_scores(self, chosen: Sequence[int], router_probs: np.ndarray | None) -> np.ndarray:
        if router_probs is None:
            s = np.zeros(self.experts)
            s[list(chosen)] = 1.0 / max(len(chosen), 1)
            return s
        probs = np.asarray(router_probs, dtype=np.float64).reshape(-1, self.experts)  # [T, E]
        return probs[0] if probs.shape[0] == 1 else probs.mean(axis=0)

    def touch(self, key: int) -> None:
        pass

    def admit(self, key: int) -> None:
        pass

    def remove(self, key: int) -> None:
        pass

    def victim(self, candidates: Sequence[int]) -> int:
        keys = np.fromiter(candidates, dtype=np.int64)                # [C]
        ranked = np.maximum(self.scores[keys], self._hints[keys])
        return int(keys[ranked == ranked.min()].min())
