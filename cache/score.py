"""ScorePolicy: HybriMoE's "minus recent score" cache, evicting the lowest router-score average."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .layout import ExpertLayout
from .policy import CachePolicy

# T = tokens of one router call, E = experts per layer, K = flat keys


class ScorePolicy(CachePolicy):
    """Per layer, at each router call with scores s [E]:

    - ``S <- alpha * s + (1 - alpha) * S`` for the ``p`` experts with the highest s,
    - ``S <- (1 - alpha) * S`` for every other expert of that layer;

    evict the candidate with the lowest S (ties: the smallest key). Scores are
    kept for every expert, resident or not. alpha defaults to HybriMoE's 0.5.

    p: ``top_p`` when given (HybriMoE uses 2 * top_k). By default (``top_p``
    None) each layer chooses between p = 2 * top_k and p = top_k by set dueling
    (as caches choose insertion policies): both score vectors are kept, and
    before each update each is asked which experts it would keep with the
    layer's current number of resident experts; the one whose keep-set held
    more of the experts the call selected (counts decayed by ``duel_decay``
    per call) ranks the layer's evictions. Crediting the near misses (ranks
    top_k+1..2*top_k) pays when router scores carry popularity, as in a
    skewed model; when they do not, p = top_k (credit exactly the selected
    experts) keeps more hits, and dueling finds which holds per layer. Ties
    go to 2 * top_k, so with no evidence the rule is HybriMoE's.

    s: each token's router scores normalised to sum 1 (softmax scores already
    do; sigmoid scores, as DeepSeek-V3's, then weigh the same), averaged over
    the call's tokens, so a prompt (prefill) weighs every token the same and a
    one-token call uses the token's scores (HybriMoE takes the first token's).
    Without scores, s = 1 / len(chosen) on the chosen experts.

    Routers whose selection does not follow their scores (a selection bias as
    in DeepSeek-V3, group-limited top-k): once a one-token call of a layer
    selects an expert that scores below one it left out, the scores no longer
    say what that layer will pick, and from then on only the chosen experts are
    credited there (s = their scores renormalised over the chosen). For plain
    top-k routers that never happens and the rule above is HybriMoE's exactly.

    ``hint(layer, scores)``: predicted scores [E] for the layer's next call (a
    predictor's output). Until that call, the layer's experts rank by
    max(S, predicted), which keeps experts predicted for the next call.
    """

    name = "score"
    wants_router_probs = True

    def __init__(self, layout: ExpertLayout, alpha: float = 0.5, top_p: int | None = None,
                 duel_decay: float = 0.99) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if top_p is not None and int(top_p) < 1:
            raise ValueError(f"top_p must be at least 1, got {top_p}")
        if not 0.0 <= duel_decay <= 1.0:
            raise ValueError(f"duel_decay must be in [0, 1], got {duel_decay}")
        self.alpha = float(alpha)
        self.experts = layout.experts_per_layer
        self.top_p = min(int(top_p or 2 * layout.top_k), self.experts)   # the rule's p (HybriMoE: 2 * top_k)
        # p of each dueling score vector: HybriMoE's first (it wins ties), then top_k
        self.candidates = (self.top_p,) if top_p is not None else tuple(dict.fromkeys(
            (self.top_p, min(layout.top_k, self.experts))))
        self.duel_decay = float(duel_decay)
        self.shadow = np.zeros((len(self.candidates), layout.num_keys), dtype=np.float64)  # [V, K] S per p
        self.merit = np.zeros((layout.num_layers, len(self.candidates)), dtype=np.float64)  # [L, V]
        self.scores = self.shadow[0].copy()                                      # [K] S that ranks evictions
        self.selection_follows_scores = np.ones(layout.num_layers, dtype=bool)   # [L]
        self._hints = np.zeros(layout.num_keys, dtype=np.float64)                 # [K] predicted, 0 = none
        self._residents = np.zeros(layout.num_layers, dtype=np.int64)             # [L] resident experts per layer

    @property
    def chosen_p(self) -> list[int]:
        """[L] the p that currently ranks each layer's evictions."""
        return [self.candidates[v] for v in self.merit.argmax(axis=1)]

    def observe(self, layer: int, chosen: Sequence[int], router_probs: np.ndarray | None = None) -> None:
        chosen = list(chosen)
        s = self._call_scores(layer, chosen, router_probs)            # [E]
        order = np.argsort(-s, kind="stable")                         # [E] highest scores first, ties by id
        base = layer * self.experts
        kept = max(int(self._residents[layer]), 1)
        for v, p in enumerate(self.candidates):
            block = self.shadow[v, base : base + self.experts]         # [E] view
            if len(self.candidates) > 1:                              # duel: would this S have kept them?
                keep = np.argsort(-block, kind="stable")[:kept]
                self.merit[layer, v] = self.duel_decay * self.merit[layer, v] + np.isin(chosen, keep).sum()
            block *= 1.0 - self.alpha
            block[order[:p]] += self.alpha * s[order[:p]]
        best = int(self.merit[layer].argmax())                        # ties: the first, HybriMoE's p
        self.scores[base : base + self.experts] = self.shadow[best, base : base + self.experts]
        self._hints[base : base + self.experts] = 0.0

    def hint(self, layer: int, scores: np.ndarray) -> None:
        base = layer * self.experts
        self._hints[base : base + self.experts] = np.asarray(scores, dtype=np.float64).reshape(self.experts)

    def _call_scores(self, layer: int, chosen: list[int], router_probs: np.ndarray | None) -> np.ndarray:
        """s [E] of one router call."""
        if router_probs is None or not chosen:
            s = np.zeros(self.experts)
            s[chosen] = 1.0 / max(len(chosen), 1)
            return s
        probs = np.asarray(router_probs, dtype=np.float64).reshape(-1, self.experts)  # [T, E]
        probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-30)
        s = probs[0] if probs.shape[0] == 1 else probs.mean(axis=0)
        picked = np.zeros(self.experts, dtype=bool)
        picked[chosen] = True
        if probs.shape[0] == 1 and not picked.all() and s[picked].min() < s[~picked].max():
            self.selection_follows_scores[layer] = False
        if self.selection_follows_scores[layer]:
            return s
        s = np.where(picked, s, 0.0)
        return s / max(s.sum(), 1e-30)

    def touch(self, key: int) -> None:
        pass

    def admit(self, key: int) -> None:
        self._residents[key // self.experts] += 1

    def remove(self, key: int) -> None:
        self._residents[key // self.experts] -= 1

    def victim(self, candidates: Sequence[int]) -> int:
        keys = np.fromiter(candidates, dtype=np.int64)                # [C]
        ranked = np.maximum(self.scores[keys], self._hints[keys])
        return int(keys[ranked == ranked.min()].min())
