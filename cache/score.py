"""ScorePolicy: HybriMoE's "minus recent score" cache, evicting the lowest router-score average."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from .base import CachePolicy
from .layout import ExpertLayout

# T = tokens of one router call, E = experts per layer, K = flat keys, V = dueling score vectors


@njit(cache=True, nogil=True)
def _call_scores(probs, chosen, follows):  # pragma: no cover - compiled
    """s [E] of one router call from scores [T, E] (T = 0: none given); may clear ``follows[0]``."""
    experts = probs.shape[1]
    s = np.zeros(experts)
    if probs.shape[0] == 0 or chosen.size == 0:
        for c in chosen:
            s[c] = 1.0 / max(chosen.size, 1)
        return s
    for t in range(probs.shape[0]):
        total = max(probs[t].sum(), 1e-30)
        for e in range(experts):
            s[e] += probs[t, e] / total
    if probs.shape[0] > 1:
        s /= probs.shape[0]
    picked = np.zeros(experts, dtype=np.bool_)
    for c in chosen:
        picked[c] = True
    if probs.shape[0] == 1 and chosen.size < experts:
        lowest_picked, highest_other = np.inf, -np.inf
        for e in range(experts):
            if picked[e]:
                lowest_picked = min(lowest_picked, s[e])
            else:
                highest_other = max(highest_other, s[e])
        if lowest_picked < highest_other:
            follows[0] = False
    if follows[0]:
        return s
    total = 0.0
    for e in range(experts):
        if not picked[e]:
            s[e] = 0.0
        total += s[e]
    return s / max(total, 1e-30)


@njit(cache=True, nogil=True)
def _observe(shadow, merit, s, chosen, candidates, kept, alpha, decay):  # pragma: no cover - compiled
    """Duel and update one layer's score vectors in place; returns the index of the one that ranks.

    shadow [V, E] (the layer's slice of every S), merit [V] (the layer's), s [E], chosen [c]."""
    experts = s.size
    top = np.argsort(-s, kind="mergesort")                # highest scores first, ties by expert id
    duel = candidates.size > 1
    for v in range(candidates.size):
        block = shadow[v]
        if duel:   # would this S have kept the selected experts, with the layer's resident count?
            held = 0
            for c in chosen:
                rank = 0
                for e in range(experts):
                    if block[e] > block[c] or (block[e] == block[c] and e < c):
                        rank += 1
                held += rank < kept
            merit[v] = decay * merit[v] + held
        block *= 1.0 - alpha
        for i in range(min(candidates[v], experts)):
            block[top[i]] += alpha * s[top[i]]
    return np.argmax(merit)                               # ties: the first, HybriMoE's p


class ScorePolicy(CachePolicy):
    """Per layer, at each router call with scores s [E]:

    - ``S <- alpha * s + (1 - alpha) * S`` for the ``p`` experts with the highest s,
    - ``S <- (1 - alpha) * S`` for every other expert of that layer;

    evict the candidate with the lowest S (ties: the smallest key). Scores are
    kept for every expert, resident or not. alpha defaults to HybriMoE's 0.5.

    Candidates of different layers (a global pool; HybriMoE's slots are per
    layer, so it never compares across layers) rank by S / d, d = how many
    router calls until the candidate's layer runs again (1 for the layer after
    the one that ran last, up to the number of layers): an expert is worth its
    chance of use per layer-step it holds a slot, so the layers that just ran
    give way first. Within one layer this is the plain S order.

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
    uses_hints = True
    needs_layout = True

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
        self.num_layers = layout.num_layers
        self._current = -1                   # the layer observed last
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
        self._candidates = np.asarray(self.candidates, dtype=np.int64)            # [V]
        self._no_probs = np.zeros((0, self.experts))                              # [0, E]: no scores given

    @property
    def chosen_p(self) -> list[int]:
        """[L] the p that currently ranks each layer's evictions."""
        return [self.candidates[v] for v in self.merit.argmax(axis=1)]

    def observe(self, layer: int, chosen: Sequence[int], router_probs: np.ndarray | None = None) -> None:
        chosen = np.asarray(chosen, dtype=np.int64).reshape(-1)
        probs = self._no_probs if router_probs is None else np.asarray(router_probs, dtype=np.float64).reshape(
            -1, self.experts)                                                # [T, E]
        lo, hi = layer * self.experts, (layer + 1) * self.experts
        follows = self.selection_follows_scores[layer : layer + 1]           # view: the kernel may clear it
        s = _call_scores(probs, chosen, follows)                             # [E]
        best = _observe(self.shadow[:, lo:hi], self.merit[layer], s, chosen, self._candidates,
                        max(int(self._residents[layer]), 1), self.alpha, self.duel_decay)
        self.scores[lo:hi] = self.shadow[best, lo:hi]
        self._hints[lo:hi] = 0.0
        self._current = layer

    def hint(self, layer: int, scores: np.ndarray) -> None:
        base = layer * self.experts
        self._hints[base : base + self.experts] = np.asarray(scores, dtype=np.float64).reshape(self.experts)

    def touch(self, key: int) -> None:
        pass

    def admit(self, key: int) -> None:
        self._residents[key // self.experts] += 1

    def remove(self, key: int) -> None:
        self._residents[key // self.experts] -= 1

    def victim(self, candidates: Sequence[int]) -> int:
        keys = np.fromiter(candidates, dtype=np.int64)                # [C]
        steps = (keys // self.experts - self._current - 1) % self.num_layers + 1   # [C] calls until its layer runs
        ranked = np.maximum(self.scores[keys], self._hints[keys]) / steps
        return int(keys[ranked == ranked.min()].min())
