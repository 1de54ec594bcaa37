"""Engine: runs one MoE layer's routed experts out of the device expert cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .cache import ExpertCache
from .stats import OffloadStats
from .transfer import CopyEngine, HostExpertStore, down_view, gate_up_view

# T = tokens, H = hidden size, k = experts per token, E = experts per layer, I = expert intermediate size


class Engine:
    """Per-layer residency lookup, demand copies and expert compute."""

    def __init__(self, store: HostExpertStore, cache: ExpertCache, copier: CopyEngine, stats: OffloadStats):
        self.store = store
        self.cache = cache
        self.copier = copier
        self.stats = stats
        self._router_probs: dict[int, torch.Tensor] = {}   # layer -> [T, E] scores of its latest router call

    def on_router(self, layer: int, gate_input: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        """RouterTap listener: runs just before the layer's experts."""
        self._router_probs[layer] = probs

    def run_layer(
        self,
        layer: int,
        hidden: torch.Tensor,          # [T, H]
        top_k_index: torch.Tensor,     # [T, k]
        top_k_weights: torch.Tensor,   # [T, k]
        act_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        num_experts, k = self.store.num_experts, top_k_index.shape[1]
        flat = top_k_index.reshape(-1)                                  # [T*k]
        order = torch.argsort(flat, stable=True)                        # [T*k] assignments grouped by expert
        rows = order // k                                               # [T*k] token row of each assignment
        weights = top_k_weights.reshape(-1)[order]                      # [T*k]
        # Host sync, once per layer: which experts run decides which copies start.
        counts = torch.bincount(flat, minlength=num_experts).tolist()   # [E]
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        selected = [e for e in range(num_experts) if counts[e]]
        keys = {e: self.store.key(layer, e) for e in selected}
        hits = [e for e in selected if self.cache.lookup(keys[e]) >= 0]
        misses = [e for e in selected if self.cache.lookup(keys[e]) < 0]
        self._count(layer, hidden.shape[0], len(hits), len(misses))
        self._observe(layer, selected)

        locked = set(keys.values())  # selected experts not yet computed: never evicted
        for e in misses:  # start copies now, into slots this layer does not need
            if not self._load(keys[e], locked):
                break
        out = torch.zeros_like(hidden)                                  # [T, H]
        for e in hits + misses:  # resident experts first, while copies land
            key = keys[e]
            slot = self.cache.lookup(key)
            if slot < 0:
                self._load(key, locked)
                slot = self.cache.lookup(key)
            idx, w = rows[starts[e] : starts[e + 1]], weights[starts[e] : starts[e + 1]]
            self.copier.acquire(slot)
            self._expert(self.cache.slots.buffers[slot], hidden, idx, w, act_fn, out)
            self.copier.release(slot)
            locked.discard(key)
            self.cache.touch(key)
        return out

    def _observe(self, layer: int, selected: list[int]) -> None:
        policy = self.cache.policy
        probs = self._router_probs.pop(layer, None)
        if policy.wants_router_probs and probs is not None:
            policy.observe(layer, selected, probs.cpu().numpy())  # host copy: the policy keeps scores on the host
        else:
            policy.observe(layer, selected)

    def _load(self, key: int, locked: set[int]) -> bool:
        got = self.cache.acquire(key, locked)
        if got is None:
            return False
        slot, evicted = got
        self.copier.copy(key, slot)
        if evicted >= 0:
            self.stats.evictions[evicted // self.store.num_experts] += 1
        return True

    def _expert(self, block, hidden, idx, w, act_fn, out) -> None:
        """out[idx] += w * expert(hidden[idx]), the same ops transformers runs."""
        shape = self.store.shape
        x = hidden[idx]                                                     # [t, H]
        gate, up = F.linear(x, gate_up_view(block, shape)).chunk(2, dim=-1) # [t, I] each
        y = F.linear(act_fn(gate) * up, down_view(block, shape))            # [t, H]
        y = y * w[:, None]
        out.index_add_(0, idx, y.to(out.dtype))

    def _count(self, layer: int, tokens: int, hits: int, misses: int) -> None:
        self.stats.layer_calls[layer] += 1
        self.stats.tokens[layer] += tokens
        self.stats.hits[layer] += hits
        self.stats.misses[layer] += misses
