"""Per-layer slot allocation: how many of the expert slots each MoE layer may hold.

L = MoE layers, E = experts per layer, S = slots

- ``global``: no quotas, one shared pool (the policy alone decides).
- ``uniform``: S split evenly over layers; the first layers take the remainder.
- ``shallow`` (Fate): the first 4 layers fully cached when the budget allows
  that and one slot for every other layer; the rest split evenly over the
  remaining layers. Otherwise uniform.
- ``dp`` (AdapMoE): dynamic programming over layers that minimises the
  expected misses, given each layer's miss curve (misses with q slots,
  q = 0..E) measured on a routing trace (moe_offload.simulate.lru_miss_curves).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .layout import ExpertLayout
from .pools import SlotPools

SHALLOW_FULL_LAYERS = 4


def _usable_slots(num_slots: int, layout: ExpertLayout) -> int:
    slots = min(int(num_slots), layout.num_keys)
    if slots < layout.num_layers:
        raise ValueError(f"a per-layer allocation needs at least one slot per MoE layer "
                         f"({layout.num_layers}), got {num_slots}")
    return slots


def even_split(slots: int, layers: int) -> list[int]:
    """``slots`` over ``layers``, as even as possible, earlier layers taking the remainder."""
    base, extra = divmod(slots, layers)
    return [base + (i < extra) for i in range(layers)]


def uniform_quotas(num_slots: int, layout: ExpertLayout) -> tuple[int, ...]:
    return tuple(even_split(_usable_slots(num_slots, layout), layout.num_layers))


def shallow_quotas(num_slots: int, layout: ExpertLayout, full_layers: int = SHALLOW_FULL_LAYERS) -> tuple[int, ...]:
    slots = _usable_slots(num_slots, layout)
    full = min(full_layers, layout.num_layers)
    rest = layout.num_layers - full
    if slots < full * layout.experts_per_layer + rest:
        return uniform_quotas(slots, layout)
    if rest == 0:
        return (layout.experts_per_layer,) * full
    return (layout.experts_per_layer,) * full + tuple(even_split(slots - full * layout.experts_per_layer, rest))


def dp_quotas(num_slots: int, miss_curves: np.ndarray) -> tuple[int, ...]:
    """Quotas q_l in [1, E] with sum q_l = min(S, L*E) minimising sum_l miss_curves[l, q_l].

    ``miss_curves`` [L, E+1]: expected misses of layer l with q slots. Ties go
    the later layer the smaller quota (shallow layers keep more).
    """
    curves = np.asarray(miss_curves, dtype=np.float64)            # [L, E+1]
    layers, experts = curves.shape[0], curves.shape[1] - 1
    slots = _usable_slots(num_slots, ExpertLayout(layers, experts, 1))
    best = np.full(slots + 1, np.inf)                               # [S+1] least misses of the layers so far
    best[0] = 0.0
    choice = np.zeros((layers, slots + 1), dtype=np.int64)         # [L, S+1] quota of layer l at that total
    for layer in range(layers):
        new = np.full(slots + 1, np.inf)
        for q in range(1, min(experts, slots) + 1):
            cand = np.full(slots + 1, np.inf)
            cand[q:] = best[: slots + 1 - q] + curves[layer, q]
            better = cand < new
            new[better] = cand[better]
            choice[layer, better] = q
        best = new
    quotas, total = [], slots
    for layer in range(layers - 1, -1, -1):
        quotas.append(int(choice[layer, total]))
        total -= quotas[-1]
    return tuple(reversed(quotas))


@dataclass(frozen=True)
class Allocation:
    """One allocation name: its per-layer quotas, and whether they need measured miss curves."""

    # (slots, layout, miss curves or None) -> quota per MoE layer; None: one shared pool, no quotas
    quotas: Callable[[int, ExpertLayout, np.ndarray | None], tuple[int, ...]] | None
    needs_miss_curves: bool = False   # measured on a routing trace: only the simulator has them


# The names of every allocation: adding one is its function and one line here.
ALLOCATIONS: dict[str, Allocation] = {
    "global": Allocation(None),
    "uniform": Allocation(lambda slots, layout, curves: uniform_quotas(slots, layout)),
    "shallow": Allocation(lambda slots, layout, curves: shallow_quotas(slots, layout)),
    "dp": Allocation(lambda slots, layout, curves: dp_quotas(slots, curves), needs_miss_curves=True),
}
RUNTIME_ALLOCATIONS = tuple(name for name, a in ALLOCATIONS.items() if not a.needs_miss_curves)


def slot_pools(name: str, num_slots: int, layout: ExpertLayout, miss_curves: np.ndarray | None = None) -> SlotPools:
    """The SlotPools of allocation ``name`` (see ALLOCATIONS)."""
    if name not in ALLOCATIONS:
        raise ValueError(f"unknown slot allocation {name!r}; choose one of {', '.join(ALLOCATIONS)}")
    allocation = ALLOCATIONS[name]
    if allocation.quotas is None:
        return SlotPools.shared(num_slots)
    if allocation.needs_miss_curves and miss_curves is None:
        raise ValueError(f"allocation {name!r} needs per-layer miss curves measured on a routing trace")
    return SlotPools.per_layer(allocation.quotas(num_slots, layout, miss_curves), layout.experts_per_layer)
