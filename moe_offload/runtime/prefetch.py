"""Prefetcher: predicted experts of the next layers copied at low priority."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..cache import ExpertLayout
from .residency import PREFETCH, ExpertResidency
from .stats import OffloadStats
from .worth import ExpectedUse, LinkBudget

# T = tokens, E = experts per layer, k = experts per token, H = hidden size


@dataclass(frozen=True)
class Prediction:
    """One router call's prediction, on the host."""

    shares: list[np.ndarray]       # per distance 1.., [E] predicted share of each expert (mean over tokens)
    weights: list[np.ndarray]      # per distance 1.., [E] total score of each expert among the tokens' top
                                   # ``width`` (-1: in no token's top)
    top_k: int = 1
    _ranked: dict = field(default_factory=dict, compare=False, repr=False)   # distance -> ranked members

    def ranked(self, distance: int) -> list[int]:
        """The experts in some token's top at ``distance``, best total score first (ties: lower id first)."""
        ranked = self._ranked.get(distance)
        if ranked is None:
            weight = self.weights[distance - 1].tolist()                         # [E]
            ranked = [e for e, w in enumerate(weight) if w >= 0]                 # ascending ids: a stable sort
            ranked.sort(key=lambda e: -weight[e])                                # keeps ties in id order
            self._ranked[distance] = ranked
        return ranked

    @property
    def next_shares(self) -> np.ndarray | None:
        """[E] the predicted shares of layer l+1 (None: no next layer)."""
        return self.shares[0] if self.shares else None

    def chance(self, distance: int, expert: int) -> float:
        """The predicted chance that layer l+distance selects ``expert``: top-k times its share, at most 1."""
        return min(1.0, self.top_k * float(self.shares[distance - 1][expert]))


def summary_parts(scores: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One call's prediction for one coming layer from its tokens' scores [..., T, E]: (top [..., T, w] each
    token's ``width`` best experts, [..., E] each expert's predicted share (the mean over tokens of its share
    of the token's scores), [..., E] its total score among the tokens' tops (-1: in no token's top)). The
    leading dims hold calls side by side (the simulator summarizes a trace's one-token calls at once)."""
    top = scores.topk(min(width, scores.shape[-1]), dim=-1).indices                 # [..., T, w]
    member = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True)
    shares = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-30)              # [..., T, E] per token
    weights = torch.where(member.any(dim=-2), scores.sum(dim=-2), -1.0)             # [..., E]
    return top, shares.mean(dim=-2), weights


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
        self.disk_pending: dict[int, int] = {}  # key -> target layer of a disk read started ahead (disk tier)
        self._predicted: dict[int, torch.Tensor] = {}   # layer -> [T, k] predicted at distance 1

    def summarize(self, layer: int, gate_input: torch.Tensor, probs: torch.Tensor,
                  chosen: torch.Tensor) -> list[torch.Tensor]:
        """Device half: the predictor observes layer ``layer`` and predicts l+1..l+depth. Returns what the
        host needs, as device tensors: [2] experts of this call found by the last distance-1 prediction and
        the call's assignments (-1, 0: nothing to score); then per distance the [E] predicted share of each
        expert (mean over tokens of its share of the token's scores) and [E] the total score of each expert
        among the tokens' top ``width`` (-1: in no token's top). ``read`` turns them, read back, into a
        Prediction."""
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
            top, shares, weights = summary_parts(scores, self.width)
            if distance == 1:
                self._predicted[target] = top[:, : chosen.shape[1]]
            parts += [shares, weights]
        return parts

    def read(self, layer: int, host: list[np.ndarray]) -> Prediction:
        """Host half, first step: the parts ``summarize`` returned, read back, as a Prediction; counts
        the live recall."""
        found, total = (int(x) for x in host[0].tolist())
        if found >= 0:
            self.stats.predicted_found[layer] += found
            self.stats.predicted_total[layer] += total
        targets = max(0, min(self.depth, self.layout.num_layers - 1 - layer))
        rest = host[1 : 1 + 2 * targets]
        return Prediction(list(rest[0::2]), list(rest[1::2]), self.layout.top_k)

    def issue(self, layer: int, prediction: Prediction, selected, budget: LinkBudget | None = None,
              use: ExpectedUse | None = None) -> None:
        """Host half, second step: queue copies for l+1, l+2, ... in rank order. ``selected``: the
        experts layer ``layer`` runs now (never evicted for a prefetch). With a ``budget`` only copies
        that land in time (``LinkBudget.fits``) are queued, and with ``use`` a copy never evicts a
        resident at least as likely to be used as the prefetched expert. With a disk tier, a predicted
        expert not in host memory is read from disk in the background instead (no link time: it is copied
        once it is there). Experts already resident are skipped."""
        locked = {self.layout.key(layer, int(e)) for e in selected} | set(self.pending)
        host = self.residency.host
        queued, device = 0, True
        for distance in range(1, len(prediction.weights) + 1):
            if host is None and (not device or (budget is not None and budget.closed(distance, queued))):
                break                                       # nothing more can be queued (nor read from disk)
            fits = device
            for e in prediction.ranked(distance):
                key = self.layout.key(layer + distance, e)
                if host is not None and not host.ready(key):    # on disk: read it into host memory first
                    if host.prefetch(key, locked):
                        self.disk_pending[key] = layer + distance
                    continue
                if self.cache.lookup(key) >= 0 or not (fits and (budget is None or budget.fits(distance, queued, e))):
                    continue
                outcome = self._issue(layer + distance, e, locked, prediction.chance(distance, e), use)
                if outcome is None:
                    device = fits = False                   # every slot this copy could take is locked
                    continue
                queued += outcome

    def _issue(self, target: int, expert: int, locked: set[int], chance: float, use: ExpectedUse | None) -> int | None:
        """Queue one copy of a missing expert: 1 if queued, 0 if not worth an eviction, None if no slot."""
        key = self.layout.key(target, expert)
        keep = locked if use is None else locked | use.protected(self.cache.slots, use.prefetch_worth(key, chance))
        if self.residency.copy_in(key, PREFETCH, keep) is None:
            return None if use is None or len(keep) == len(locked) else 0
        self.pending[key] = target
        locked.add(key)
        self.stats.prefetch_issued[target] += 1
        return 1

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
            if key in selected_keys and self.cache.lookup(key) >= 0:   # (evicted before use: wasted)
                self.stats.prefetch_used[target] += 1
                continue
            self.stats.prefetch_wasted[target] += 1
            if self.residency.drop(key):
                self.stats.prefetch_cancelled[target] += 1
        for key, target in list(self.disk_pending.items()):
            if target <= layer:
                del self.disk_pending[key]
                if key not in selected_keys:
                    self.residency.host.cancel(key)   # a stale read that has not started frees its row
        self.residency.copier.pump()
