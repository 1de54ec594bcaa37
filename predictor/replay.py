"""Replay a recorded trace through a predictor, the way the runtime would call it, and count hits.

N = traced tokens, T = tokens in a step, L = MoE layers, E = experts per layer, k = experts per token, H = hidden size
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from .base import Predictor
from .metrics import RecallCounter
from .trace import Trace


def sequence_slices(trace: Trace) -> list[slice]:
    """Row range of each sequence, in trace order (a sequence's tokens are contiguous)."""
    starts = np.flatnonzero(np.r_[True, trace.sequence[1:] != trace.sequence[:-1]])
    ends = np.r_[starts[1:], trace.num_tokens]
    return [slice(int(s), int(e)) for s, e in zip(starts, ends)]


def replay(predictor: Predictor, trace: Trace, distances: Iterable[int] = (1, 2, 3),
           counted: np.ndarray | None = None, stepwise: bool = False) -> dict[int, RecallCounter]:
    """Feed ``trace`` token by token, as decode steps (or a whole sequence per step when the
    predictor's rows are independent, or through ``Predictor.whole_sequence`` when it has that
    shortcut: both give the same scores faster); count, for each distance d, how well
    ``predict(l, d)`` finds the experts layer l+d truly picked.

    ``counted`` [N] bool restricts the counting (not the feeding) to some tokens. ``stepwise`` walks
    token by token even where a shortcut exists (the reference the shortcuts are tested against).
    """
    if predictor.needs_gate_inputs and trace.gate_inputs is None:
        raise ValueError(f"predictor {predictor.name!r} needs gate inputs; record the trace with gate_inputs")
    distances = list(distances)
    layers = trace.num_layers
    counters = {d: RecallCounter(layers, trace.top_k) for d in distances}
    ids = torch.from_numpy(trace.expert_ids.astype(np.int64))                   # [N, L, k]
    probs = torch.from_numpy(trace.router_probs.astype(np.float32))             # [N, L, E]
    if trace.gate_inputs is not None:
        gates = torch.from_numpy(trace.gate_inputs.astype(np.float32))          # [N, L, H]
    else:
        gates = torch.zeros(trace.num_tokens, layers, 0)                        # [N, L, 0]
    keep = torch.ones(trace.num_tokens, dtype=torch.bool) if counted is None else torch.from_numpy(counted)
    for seq in sequence_slices(trace):
        predictor.reset()
        shortcut = not (predictor.row_independent or stepwise)
        whole = predictor.whole_sequence(gates[seq], ids[seq], probs[seq]) if shortcut else None
        if whole is not None:
            for layer in range(layers):
                for d in distances:
                    if layer + d < layers:
                        _count(counters[d], layer + d, whole(layer, d), ids[seq, layer + d], keep[seq])
            continue
        for rows in _steps(seq, predictor.row_independent and not stepwise):
            for layer in range(layers):
                predictor.observe(layer, gates[rows, layer], ids[rows, layer], probs[rows, layer])
                for d in distances:
                    if layer + d < layers:
                        _count(counters[d], layer + d, predictor.predict(layer, d), ids[rows, layer + d], keep[rows])
    return counters


def _steps(seq: slice, whole: bool) -> list[slice]:
    if whole:
        return [seq]
    return [slice(t, t + 1) for t in range(seq.start, seq.stop)]


def _count(counter: RecallCounter, target: int, scores: torch.Tensor, chosen: torch.Tensor,
           keep: torch.Tensor) -> None:
    if keep.all():
        counter.add(target, scores, chosen)
    elif keep.any():
        counter.add(target, scores[keep], chosen[keep])
