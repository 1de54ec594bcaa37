"""RoutingArrays: a routing trace as plain arrays, split into the router calls the runtime makes (the
simulator's input).

N = tokens, L = MoE layers, k = experts per token, E = experts per layer

The runtime calls each layer's router once per forward pass: once for a whole
prompt (prefill) and once per generated token (decode). ``call_spans`` rebuilds
those calls from a trace: a maximal run of consecutive prefill tokens of one
sequence is one call, and every decode token is a call of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cache.layout import ExpertLayout


def call_spans(sequence: np.ndarray, decode: np.ndarray) -> np.ndarray:
    """[G, 2] (start, end) token ranges of the router calls, in order."""
    sequence, decode = np.asarray(sequence), np.asarray(decode, dtype=bool)
    n = len(sequence)
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    starts = np.ones(n, dtype=bool)
    starts[1:] = (sequence[1:] != sequence[:-1]) | decode[1:] | decode[:-1]
    first = np.flatnonzero(starts)
    return np.stack([first, np.append(first[1:], n)], axis=1)


@dataclass(frozen=True)
class RoutingArrays:
    """The arrays of a routing trace the cache side needs; any object with these attributes converts."""

    expert_ids: np.ndarray            # [N, L, k] selected experts
    router_probs: np.ndarray | None   # [N, L, E] router scores, or None
    sequence: np.ndarray              # [N] prompt each token belongs to (contiguous)
    decode: np.ndarray                # [N] False for prompt tokens
    num_experts: int = 0              # E; 0: router_probs.shape[2]
    gate_inputs: np.ndarray | None = None   # [N, L, H] each layer's router input, or None (for gate predictors)

    def __post_init__(self) -> None:
        if self.expert_ids.ndim != 3:
            raise ValueError(f"expert_ids must be [N, L, k], got shape {self.expert_ids.shape}")
        n = self.expert_ids.shape[0]
        if self.sequence.shape != (n,) or self.decode.shape != (n,):
            raise ValueError("sequence and decode need one entry per token")
        if self.router_probs is None and not self.num_experts:
            raise ValueError("give router_probs or num_experts")
        if self.router_probs is not None and self.router_probs.shape[:2] != self.expert_ids.shape[:2]:
            raise ValueError(f"router_probs {self.router_probs.shape} does not match "
                             f"expert_ids {self.expert_ids.shape}")

    @classmethod
    def of(cls, trace) -> "RoutingArrays":
        """From a predictor Trace (or anything with expert_ids, router_probs, sequence, decode)."""
        return cls(np.asarray(trace.expert_ids), trace.router_probs, np.asarray(trace.sequence),
                   np.asarray(trace.decode, dtype=bool), gate_inputs=getattr(trace, "gate_inputs", None))

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def layout(self) -> ExpertLayout:
        _, layers, k = self.expert_ids.shape
        experts = self.num_experts or self.router_probs.shape[2]
        return ExpertLayout(layers, experts, k)

    def spans(self) -> np.ndarray:
        """[G, 2] token ranges of the router calls."""
        return call_spans(self.sequence, self.decode)

    def select_tokens(self, end: int) -> "RoutingArrays":
        """The first ``end`` tokens."""
        probs = None if self.router_probs is None else self.router_probs[:end]
        gates = None if self.gate_inputs is None else self.gate_inputs[:end]
        return RoutingArrays(self.expert_ids[:end], probs, self.sequence[:end], self.decode[:end], self.num_experts,
                             gates)


@dataclass(frozen=True, slots=True)
class RouterCall:
    """One router call of one layer: its selected experts as flat keys (ascending) and their token counts."""

    layer: int
    start: int
    end: int
    keys: list[int]
    tokens: list[int]


def router_calls(routing: RoutingArrays) -> list[list[RouterCall]]:
    """[G][L] calls: every layer's call for every call span, in the order the runtime makes them."""
    layout = routing.layout
    offsets = (np.arange(layout.num_layers) * layout.experts_per_layer)[None, :, None]   # [1, L, 1]
    keys = np.sort(routing.expert_ids.astype(np.int64), axis=2) + offsets                 # [N, L, k]
    calls = []
    for start, end in routing.spans().tolist():
        if end - start == 1:   # one token: top-k ids are distinct, one token each
            rows = keys[start].tolist()
            calls.append([RouterCall(l, start, end, rows[l], [1] * len(rows[l])) for l in range(layout.num_layers)])
            continue
        per_layer = []
        for layer in range(layout.num_layers):
            unique, counts = np.unique(keys[start:end, layer], return_counts=True)
            per_layer.append(RouterCall(layer, start, end, unique.tolist(), counts.tolist()))
        calls.append(per_layer)
    return calls
