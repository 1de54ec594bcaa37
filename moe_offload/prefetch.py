"""Prefetcher: predicted experts of the next layers copied at low priority."""

from __future__ import annotations

import torch

from .residency import PREFETCH, ExpertResidency
from .stats import OffloadStats

# T = tokens, E = experts per layer, k = experts per token, H = hidden size


class Prefetcher:
    """Asks a predictor at each router call and queues copies for layers l+1..l+depth.

    A prefetch never evicts an expert the current layer selected or one already
    prefetched for a coming layer. When the target layer runs, prefetches it
    selected count as used; the others as wasted, and those still queued are
    cancelled before they start and their slots freed.
    """

    def __init__(self, predictor, residency: ExpertResidency, store, stats: OffloadStats, depth: int, width: int):
        self.predictor = predictor
        self.residency = residency
        self.cache = residency.cache
        self.store = store                      # sizes and flat keys (a HostExpertStore or the like)
        self.stats = stats
        self.depth = depth
        self.width = width                      # experts per token fetched for each coming layer
        self.pending: dict[int, int] = {}       # key -> target layer
        self._predicted: dict[int, torch.Tensor] = {}   # layer -> [T, k] predicted at distance 1

    def on_router(self, layer: int, gate_input: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        if layer == 0 and chosen.shape[0] > 1:  # a prompt: a new sequence starts
            self.predictor.reset()
            self._predicted.clear()
        self._score_live_recall(layer, chosen)
        self.predictor.observe(layer, gate_input, chosen, probs)
        locked = {self.store.key(layer, int(e)) for e in chosen.unique().tolist()} | set(self.pending)
        for distance in range(1, self.depth + 1):
            target = layer + distance
            if target >= self.store.num_layers:
                break
            scores = self.predictor.predict(layer, distance)                        # [T, E]
            top = scores.topk(min(self.width, scores.shape[-1]), dim=-1).indices    # [T, w]
            if distance == 1:
                self._hint(target, scores)
                self._predicted[target] = top[:, : chosen.shape[1]]
            if not self._issue(target, self._rank(scores, top), locked):
                break

    def _hint(self, target: int, scores: torch.Tensor) -> None:
        """Tell the cache policy what the next layer is predicted to use (a score policy then keeps it)."""
        policy = self.cache.policy
        if not policy.uses_hints:
            return
        s = scores.float()
        s = (s / s.sum(dim=-1, keepdim=True).clamp_min(1e-30)).mean(dim=0)           # [E] per-token shares
        policy.hint(target, s.cpu().numpy())  # host copy: the policy keeps scores on the host

    @staticmethod
    def _rank(scores: torch.Tensor, top: torch.Tensor) -> list[int]:
        """Union of per-token top experts, most total score first."""
        experts = top.unique()
        weight = scores[:, experts].float().sum(dim=0)
        return experts[weight.argsort(descending=True)].tolist()

    def _issue(self, target: int, experts: list[int], locked: set[int]) -> bool:
        for e in experts:
            key = self.store.key(target, e)
            if self.cache.lookup(key) >= 0:
                continue
            if self.residency.copy_in(key, PREFETCH, locked) is None:
                return False
            self.pending[key] = target
            locked.add(key)
            self.stats.prefetch_issued[target] += 1
        return True

    def _score_live_recall(self, layer: int, chosen: torch.Tensor) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is None or predicted.shape[0] != chosen.shape[0]:
            return
        found = (predicted.unsqueeze(-1) == chosen.unsqueeze(1)).any(dim=1).sum()  # [T, k] -> scalar
        self.stats.predicted_found[layer] += int(found)
        self.stats.predicted_total[layer] += chosen.numel()

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
