"""Prefetcher: predicted experts of the next layers copied at low priority."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..cache import ExpertLayout
from .residency import PREFETCH, ExpertResidency
from .stats import OffloadStats

# T = tokens, E = experts per layer, k = experts per token, H = hidden size


@dataclass(frozen=True)
class Prediction:
    """One router call's prediction, on the host."""

    shares: np.ndarray | None      # [E] predicted share of each expert at distance 1 (None: no next layer)
    weights: list[np.ndarray]      # per distance 1.., [E] total score of each expert among the tokens' top
                                   # ``width`` (-1: in no token's top)


class Prefetcher:
    """Asks a predictor at each router call and queues copies for layers l+1..l+depth.

    A prefetch never evicts an expert the current layer selected or one already
    prefetched for a coming layer. When the target layer runs, prefetches it
    selected count as used; the others as wasted, and those still queued are
    cancelled before they start and their slots freed.
    """

    def __init__(self, predictor, residency: ExpertResidency, layout: ExpertLayout, stats: OffloadStats, depth: int,
                 width: int):
        self.predictor = predictor
        self.residency = residency
        self.cache = residency.cache
        self.layout = layout
        self.stats = stats
        self.depth = depth
        self.width = width                      # experts per token fetched for each coming layer
        self.pending: dict[int, int] = {}       # key -> target layer
        self._predicted: dict[int, torch.Tensor] = {}   # layer -> [T, k] predicted at distance 1

    def summarize(self, layer: int, gate_input: torch.Tensor, probs: torch.Tensor,
                  chosen: torch.Tensor) -> list[torch.Tensor]:
        """Device half: the predictor observes layer ``layer`` and predicts l+1..l+depth. Returns what the
        host needs, as device tensors: [2] experts of this call found by the last distance-1 prediction and
        the call's assignments (-1, 0: nothing to score); for d = 1 the [E] predicted share of each expert;
        per distance, [E] the total score of each expert among the tokens' top ``width`` (-1: in no
        token's top). ``read`` turns them, read back, into a Prediction."""
        if layer == 0 and chosen.shape[0] > 1:  # a prompt: a new sequence starts
            self.predictor.reset()
            self._predicted.clear()
        parts = [self._live_recall(layer, chosen)]
        self.predictor.observe(layer, gate_input, chosen, probs)
        for distance in range(1, self.depth + 1):
            target = layer + distance
            if target >= self.layout.num_layers:
                break
            scores = self.predictor.predict(layer, distance).float()                # [T, E]
            top = scores.topk(min(self.width, scores.shape[-1]), dim=-1).indices    # [T, w]
            if distance == 1:
                self._predicted[target] = top[:, : chosen.shape[1]]
                shares = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-30)  # [T, E] per-token shares
                parts.append(shares.mean(dim=0))                                     # [E]
            member = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            member[top.reshape(-1)] = True                                           # [E] in some token's top
            parts.append(torch.where(member, scores.sum(dim=0), -1.0))               # [E]
        return parts

    def read(self, layer: int, host: list[np.ndarray]) -> Prediction:
        """Host half, first step: the parts ``summarize`` returned, read back, as a Prediction; counts
        the live recall."""
        found, total = (int(x) for x in host[0])
        if found >= 0:
            self.stats.predicted_found[layer] += found
            self.stats.predicted_total[layer] += total
        targets = min(self.depth, self.layout.num_layers - 1 - layer)
        if targets < 1:
            return Prediction(None, [])
        return Prediction(host[1], list(host[2 : 2 + targets]))

    def issue(self, layer: int, prediction: Prediction, selected) -> None:
        """Host half, second step: queue copies for l+1, l+2, ... in rank order. ``selected``: the
        experts layer ``layer`` runs now (never evicted for a prefetch)."""
        locked = {self.layout.key(layer, int(e)) for e in selected} | set(self.pending)
        for distance, weight in enumerate(prediction.weights, 1):                    # [E] each
            members = np.flatnonzero(weight >= 0)
            ranked = members[np.argsort(-weight[members], kind="stable")]
            if not self._issue(layer + distance, ranked.tolist(), locked):
                break

    def _issue(self, target: int, experts: list[int], locked: set[int]) -> bool:
        for e in experts:
            key = self.layout.key(target, e)
            if self.cache.lookup(key) >= 0:
                continue
            if self.residency.copy_in(key, PREFETCH, locked) is None:
                return False
            self.pending[key] = target
            locked.add(key)
            self.stats.prefetch_issued[target] += 1
        return True

    def _live_recall(self, layer: int, chosen: torch.Tensor) -> torch.Tensor:
        """[2] how many of this call's T*k assignments the distance-1 prediction made one layer earlier
        holds, and T*k; (-1, 0) when there is no such prediction."""
        predicted = self._predicted.pop(layer, None)
        out = torch.full((2,), float(chosen.numel()), device=chosen.device)   # device fills: no host copy
        if predicted is None or predicted.shape[0] != chosen.shape[0]:
            out[0], out[1] = -1.0, 0.0
            return out
        out[0] = (predicted.unsqueeze(-1) == chosen.unsqueeze(1)).any(dim=1).sum()  # [T, k] -> found
        return out

    def begin_layer(self, layer: int, selected_keys: set[int]) -> None:
        """Settle the prefetches aimed at ``layer`` before it runs."""
        for key, target in list(self.pending.items()):
            if target > layer:
                continue
            del self.pending[key]
            if key in selected_keys:
                self.stats.prefetch_used[target] += 1
                continue
            self.stats.prefetch_wasted[target] += 1
            if self.residency.drop(key):
                self.stats.prefetch_cancelled[target] += 1
        self.residency.copier.pump()
