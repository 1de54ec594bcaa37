"""Per-layer LRU miss curves of a routing trace: what the 'dp' slot allocation splits the budget by."""

from __future__ import annotations

import numpy as np

from .calls import RoutingArrays, router_calls


def lru_miss_curves(routing: RoutingArrays) -> np.ndarray:
    """[L, E+1] misses of each layer with q = 0..E slots, from LRU stack distances on ``routing``.

    One pass per layer (Mattson et al. 1970): an expert used again after d
    other distinct experts of its layer hits with q slots iff d < q. Exact for
    per-layer LRU with one access at a time; a measured estimate for the other
    policies and for calls that select several experts at once.
    """
    layout = routing.layout
    experts = layout.experts_per_layer
    histogram = np.zeros((layout.num_layers, experts + 1), dtype=np.int64)   # [L, E+1] distance counts; E = first use
    recency = [[] for _ in range(layout.num_layers)]                          # per layer, oldest first
    for calls in router_calls(routing):
        for call in calls:
            order = recency[call.layer]
            for key in call.keys:
                d = len(order) - 1 - order.index(key) if key in order else experts
                histogram[call.layer, d] += 1
            for key in call.keys:
                if key in order:
                    order.remove(key)
                order.append(key)
    return np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]                   # misses[l, q] = sum_{d >= q}
