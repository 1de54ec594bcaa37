"""Baseline predictors: previous token, static popularity, and the oracle (the true future).

N = traced tokens, T = tokens in the current step, L = MoE layers, E = experts per layer, k = experts per token
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import Predictor, SequenceScores
from .trace import Trace

# Chosen experts get this added to their router score so they rank before every
# other expert (router scores are softmax or sigmoid values, at most 1).
_CHOSEN_BONUS = 2.0


def chosen_first(chosen: Tensor, probs: Tensor) -> Tensor:
    """[T, E] scores ranking the chosen experts [T, k] first, then the rest by router score [T, E]."""
    scores = probs.float().clone()
    return scores.scatter_add_(1, chosen.long(), torch.full(chosen.shape, _CHOSEN_BONUS, dtype=scores.dtype,
                                                            device=scores.device))


class PreviousTokenPredictor(Predictor):
    """Layer l+d will pick what the latest token whose layer l+d is known picked there.

    At decode that is the previous token. Within one prefill step every row gets
    the last token of the previous step (the rows' own layer l+d is not known yet).
    Before any history the scores are all zero.
    """

    name = "previous"

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__(num_layers, num_experts)
        self._last: list[Tensor | None] = [None] * num_layers   # L x [E] scores of the latest token
        self._rows = 0

    def reset(self) -> None:
        self._last = [None] * self.num_layers

    def observe(self, layer: int, gate_input: Tensor, chosen: Tensor, probs: Tensor) -> None:
        # The current step's layer-l routing replaces the history only after predictions from
        # layers < l were made, which is the order the runtime calls in.
        self._rows = chosen.shape[0]
        self._last[layer] = chosen_first(chosen[-1:], probs[-1:])[0]           # [E]

    def predict(self, layer: int, distance: int) -> Tensor:
        last = self._last[self.check_target(layer, distance)]
        if last is None:
            return torch.zeros(self._rows, self.num_experts)
        return last.expand(self._rows, -1).clone()                             # [T, E]

    def whole_sequence(self, gates: Tensor, ids: Tensor, probs: Tensor) -> SequenceScores:
        """Token t's scores for layer l+d are token t-1's routing there (none for the first token)."""
        tokens = ids.shape[0]

        def scores(layer: int, distance: int) -> Tensor:
            target = self.check_target(layer, distance)
            out = torch.zeros(tokens, self.num_experts)                        # [T, E]
            if tokens > 1:
                out[1:] = chosen_first(ids[:-1, target], probs[:-1, target])
            return out

        return scores


class PopularityPredictor(Predictor):
    """Static per-layer popularity: how often each expert was selected in a fit trace."""

    name = "popularity"
    row_independent = True

    def __init__(self, frequency: Tensor):
        super().__init__(frequency.shape[0], frequency.shape[1])
        self.frequency = frequency.float()                                      # [L, E] share of tokens
        self._rows = 0

    @classmethod
    def fit(cls, trace: Trace) -> "PopularityPredictor":
        n, layers, _ = trace.expert_ids.shape
        counts = np.zeros((layers, trace.num_experts), np.float64)             # [L, E]
        for layer in range(layers):
            counts[layer] = np.bincount(trace.expert_ids[:, layer].reshape(-1).astype(np.int64),
                                        minlength=trace.num_experts)
        return cls(torch.from_numpy(counts / max(n, 1)))

    def observe(self, layer: int, gate_input: Tensor, chosen: Tensor, probs: Tensor) -> None:
        self._rows = chosen.shape[0]

    def predict(self, layer: int, distance: int) -> Tensor:
        return self.frequency[self.check_target(layer, distance)].expand(self._rows, -1).clone()  # [T, E]


class OraclePredictor(Predictor):
    """The true future, read from the trace being replayed: the bound no predictor can beat.

    It walks the trace in order: each observation of layer 0 takes the next T
    tokens, and checks they are the ones the trace holds.
    """

    name = "oracle"
    row_independent = True

    def __init__(self, trace: Trace):
        super().__init__(trace.num_layers, trace.num_experts)
        self.expert_ids = torch.from_numpy(trace.expert_ids.astype(np.int64))          # [N, L, k]
        self.router_probs = torch.from_numpy(trace.router_probs.astype(np.float32))    # [N, L, E]
        self._start = 0
        self._next = 0

    def rewind(self) -> None:
        """Start again at the trace's first token."""
        self._start = self._next = 0

    def observe(self, layer: int, gate_input: Tensor, chosen: Tensor, probs: Tensor) -> None:
        if layer != 0:
            return
        self._start, self._next = self._next, self._next + chosen.shape[0]
        expected = self.expert_ids[self._start:self._next, 0]                           # [T, k]
        if expected.shape != chosen.shape or not torch.equal(expected, chosen.long().cpu()):
            raise ValueError(f"oracle: tokens {self._start}..{self._next} are not the trace's; replay the "
                             "trace the oracle was built on, in order")

    def predict(self, layer: int, distance: int) -> Tensor:
        target = self.check_target(layer, distance)
        rows = slice(self._start, self._next)
        return chosen_first(self.expert_ids[rows, target], self.router_probs[rows, target])  # [T, E]


class RecallOraclePredictor(OraclePredictor):
    """``oracle@R``: the true next-layer experts, each kept with probability ``recall`` and otherwise
    replaced by a random expert the token did not select; only these k experts are ranked (equal scores).
    Shows what a predictor of recall R buys. The replacements are drawn once per trace (``seed``)."""

    row_independent = True

    def __init__(self, trace: Trace, recall: float, seed: int = 0):
        super().__init__(trace)
        if not 0.0 <= recall <= 1.0:
            raise ValueError(f"oracle recall must be in [0, 1], got {recall}")
        self.name = f"oracle@{recall:g}"
        self.recall = recall
        self.noisy_ids = torch.from_numpy(_with_recall(trace.expert_ids.astype(np.int64), trace.num_experts,
                                                       recall, np.random.default_rng(seed)))   # [N, L, k]

    def predict(self, layer: int, distance: int) -> Tensor:
        target = self.check_target(layer, distance)
        chosen = self.noisy_ids[self._start:self._next, target]                          # [T, k]
        return chosen_first(chosen, torch.zeros(chosen.shape[0], self.num_experts))      # [T, E]


def _with_recall(ids: np.ndarray, experts: int, recall: float, rng: np.random.Generator) -> np.ndarray:
    """[N, L, k] ``ids`` with each entry kept with probability ``recall``, else a random expert outside the row."""
    out = ids.copy()
    n, layers, k = ids.shape
    replace = rng.random(ids.shape) >= recall
    for t, layer in zip(*np.nonzero(replace.any(axis=2))):
        others = np.setdiff1d(np.arange(experts), ids[t, layer])
        picks = rng.choice(others, size=int(replace[t, layer].sum()), replace=False)
        out[t, layer, replace[t, layer]] = picks
    return out
