"""Routing traces: what the routers chose, token by token, saved as a small versioned .npz.

N = traced tokens, L = MoE layers, k = experts per token, E = experts per layer, H = hidden size

File format (version 1), arrays of one ``np.savez_compressed`` file:
- ``expert_ids``   int16   [N, L, k]  selected experts, in router order
- ``router_probs`` float16 [N, L, E]  router scores over all experts (softmax, or sigmoid for DeepSeek-V3)
- ``gate_inputs``  float16 [N, L, H]  optional: the router's input (the layer's post-attention-norm hidden)
- ``sequence``     int32   [N]        which prompt a token belongs to (tokens of a prompt are contiguous)
- ``decode``       bool    [N]        False for prompt (prefill) tokens, True for generated tokens
- ``meta``         0-d str            JSON: version, model, model_type, num_experts, top_k, moe_layers
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TRACE_VERSION = 1


class TraceFormatError(ValueError):
    """A file that is not a routing trace of a version this code reads."""


@dataclass
class Trace:
    expert_ids: np.ndarray                 # [N, L, k] int16
    router_probs: np.ndarray               # [N, L, E] float16
    sequence: np.ndarray                   # [N] int32
    decode: np.ndarray                     # [N] bool
    gate_inputs: np.ndarray | None = None  # [N, L, H] float16
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, layers, _ = self.expert_ids.shape
        if self.router_probs.shape[:2] != (n, layers):
            raise TraceFormatError(f"router_probs {self.router_probs.shape} does not match expert_ids {self.expert_ids.shape}")
        if self.sequence.shape != (n,) or self.decode.shape != (n,):
            raise TraceFormatError("sequence and decode need one entry per token")
        if self.gate_inputs is not None and self.gate_inputs.shape[:2] != (n, layers):
            raise TraceFormatError(f"gate_inputs {self.gate_inputs.shape} does not match expert_ids {self.expert_ids.shape}")

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def num_experts(self) -> int:
        return self.router_probs.shape[2]

    def tokens(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(sequence, expert_ids [L, k], router_probs [L, E]) per token, in order."""
        for t in range(self.num_tokens):
            yield int(self.sequence[t]), self.expert_ids[t], self.router_probs[t]

    def select(self, mask: np.ndarray) -> "Trace":
        """The tokens where ``mask`` [N] is true."""
        gi = None if self.gate_inputs is None else self.gate_inputs[mask]
        return Trace(self.expert_ids[mask], self.router_probs[mask], self.sequence[mask], self.decode[mask], gi,
                     dict(self.meta))

    def split_sequences(self, every: int = 5) -> tuple["Trace", "Trace"]:
        """(fit, held_out): every ``every``-th sequence is held out."""
        held = (self.sequence % every) == every - 1
        return self.select(~held), self.select(held)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {"version": TRACE_VERSION, "num_experts": self.num_experts, "top_k": self.top_k} | self.meta
        arrays = dict(expert_ids=self.expert_ids.astype(np.int16), router_probs=self.router_probs.astype(np.float16),
                      sequence=self.sequence.astype(np.int32), decode=self.decode.astype(bool),
                      meta=np.array(json.dumps(meta)))
        if self.gate_inputs is not None:
            arrays["gate_inputs"] = self.gate_inputs.astype(np.float16)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
            meta = json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError) as err:
            raise TraceFormatError(f"{path} is not a routing trace ({err})") from None
        if meta.get("version") != TRACE_VERSION:
            raise TraceFormatError(f"{path} is trace version {meta.get('version')}; this code reads {TRACE_VERSION}")
        gi = data["gate_inputs"] if "gate_inputs" in data.files else None
        return cls(data["expert_ids"], data["router_probs"], data["sequence"], data["decode"], gi, meta)

    @classmethod
    def concatenate(cls, traces: list["Trace"]) -> "Trace":
        """Join traces, renumbering sequences so they stay distinct."""
        seqs, offset = [], 0
        for t in traces:
            seqs.append(t.sequence + offset)
            offset += int(t.sequence.max()) + 1 if t.num_tokens else 0
        gi = None if any(t.gate_inputs is None for t in traces) else np.concatenate([t.gate_inputs for t in traces])
        return cls(np.concatenate([t.expert_ids for t in traces]), np.concatenate([t.router_probs for t in traces]),
                   np.concatenate(seqs), np.concatenate([t.decode for t in traces]), gi, dict(traces[0].meta))
