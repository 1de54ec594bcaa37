"""MoE-Infinity's expert activation matrix (EAM) predictor.

S = stored sequences, T = tokens in the current step, L = MoE layers, E = experts per layer, k = experts per token

Each sequence has an activation matrix [L, E]: how many of its tokens picked
each expert at each layer. The matrices of fitted sequences are stored; while a
sequence runs, its own matrix so far is matched by cosine similarity to the
stored ones, and the best match's counts at the target layer are the scores.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import Predictor, SequenceScores
from .trace import Trace

# Weight of the stored matrices' mean, added to break ties between experts the best match never used.
_TIE_BREAK = 1e-3


def activation_matrices(trace: Trace) -> Tensor:
    """[S, L, E] per-sequence expert activation counts of ``trace``."""
    sequences = np.unique(trace.sequence)
    index = np.searchsorted(sequences, trace.sequence)                          # [N] row of each token's sequence
    n, layers, k = trace.expert_ids.shape
    counts = np.zeros((len(sequences), layers, trace.num_experts), np.float32)  # [S, L, E]
    layer = np.broadcast_to(np.arange(layers)[None, :, None], (n, layers, k))
    seq = np.broadcast_to(index[:, None, None], (n, layers, k))
    np.add.at(counts, (seq, layer, trace.expert_ids.astype(np.int64)), 1.0)
    return torch.from_numpy(counts)


class ActivationMatrixPredictor(Predictor):
    """Scores layer l+d by the most similar stored sequence's activation counts there."""

    name = "eam"

    def __init__(self, stored: Tensor):
        super().__init__(stored.shape[1], stored.shape[2])
        self.stored = stored.float()                                            # [S, L, E]
        # Similarity in exact integer arithmetic (counts are integers): the dot products are exact
        # whatever order they are summed in, so a whole-sequence replay picks the same match.
        self._counts = stored.round().long()                                    # [S, L, E]
        flat = self._counts.flatten(1).double()                                 # [S, L*E]
        self._stored_norm = flat.norm(dim=1).clamp_min(1e-12)                   # [S]
        self._prior = self.stored.mean(0)                                       # [L, E]
        self._prior = self._prior / self._prior.sum(-1, keepdim=True).clamp_min(1e-12)
        self._current = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)  # [L, E]
        self._best: Tensor | None = None                                        # [L, E] best match's counts
        self._rows = 0

    @classmethod
    def fit(cls, trace: Trace) -> "ActivationMatrixPredictor":
        return cls(activation_matrices(trace))

    def reset(self) -> None:
        self._current.zero_()
        self._best = None

    def observe(self, layer: int, gate_input: Tensor, chosen: Tensor, probs: Tensor) -> None:
        self._rows = chosen.shape[0]
        ids = chosen.long().cpu().reshape(-1)                                   # [T*k]
        self._current[layer].index_add_(0, ids, torch.ones(ids.shape[0], dtype=torch.long))
        self._best = self.stored[self.best_match()]

    def best_match(self) -> int:
        """Index of the stored sequence whose matrix is most cosine-similar to the current one."""
        dots = self._counts.flatten(1) @ self._current.flatten()                # [S] exact integers
        return int(torch.argmax(dots.double() / self._stored_norm))

    def predict(self, layer: int, distance: int) -> Tensor:
        target = self.check_target(layer, distance)
        best = self._best[target] if self._best is not None else torch.zeros(self.num_experts)
        return self._scores(best, target).expand(self._rows, -1).clone()        # [T, E]

    def _scores(self, best: Tensor, target: int) -> Tensor:
        """Scores [..., E] from a best match's counts ``best`` [..., E] at layer ``target``."""
        return best / best.sum(-1, keepdim=True).clamp_min(1.0) + _TIE_BREAK * self._prior[target]

    def whole_sequence(self, gates: Tensor, ids: Tensor, probs: Tensor) -> SequenceScores:
        """The best match after each (token, layer) observation, from running sums of the integer dot products."""
        tokens, layers, _ = ids.shape
        by_expert = self._counts.permute(1, 2, 0)                               # [L, E, S]
        added = by_expert[torch.arange(layers)[None, :, None], ids.long()].sum(2)  # [T, L, S] one observation's dots
        earlier = added.sum(1).cumsum(0) - added.sum(1)                         # [T, S] tokens before t, every layer
        dots = earlier[:, None, :] + added.cumsum(1)                            # [T, L, S] after token t's layer l
        best = torch.argmax(dots.double() / self._stored_norm, dim=2)           # [T, L]

        def scores(layer: int, distance: int) -> Tensor:
            target = self.check_target(layer, distance)
            return self._scores(self.stored[best[:, layer], target], target)    # [T, E]

        return scores
