"""Synthetic routing traces with the statistics that matter to an expert cache.

N = tokens, L = MoE layers, E = experts per layer, k = experts per token

- Skew: each layer has a Zipf-like popularity, p(rank r) proportional to
  (r + 1) ** -skew (skew 0 = uniform), over a random permutation of its
  experts, so every layer has different favourites.
- Selection: a token's experts at a layer are the top-k of
  ``log p + g`` with g i.i.d. Gumbel noise, which draws k distinct experts
  from p without replacement (the Gumbel-top-k trick). The router scores are
  ``softmax(log p + g)``, so the selected experts are exactly the top-k of
  the scores, as with a real router.
- Temporal locality: with probability ``repeat`` a token reuses the previous
  token's noise at a layer, hence its experts and scores there (never across
  sequences).
- Cross-layer correlation (optional): with probability ``cross_layer`` a
  token's noise at layer l is its noise at layer l-1 carried through a fixed
  random permutation of the experts, so the choice at l-1 predicts the
  choice at l.
- Sequences: ``tokens_per_sequence`` tokens each (default: one sequence);
  the first ``prompt_tokens`` of each are marked as prompt (prefill).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .trace import Trace


@dataclass(frozen=True)
class SyntheticTraceConfig:
    tokens: int = 4096
    layers: int = 16
    experts: int = 64
    top_k: int = 4
    skew: float = 1.0                      # Zipf exponent of per-layer popularity
    repeat: float = 0.3                    # P(a token repeats the previous token's experts at a layer)
    cross_layer: float = 0.0               # P(a token's layer-l noise follows its layer l-1 noise)
    tokens_per_sequence: int | None = None
    prompt_tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k must be in [1, experts], got {self.top_k}")
        if not (0.0 <= self.repeat <= 1.0 and 0.0 <= self.cross_layer <= 1.0):
            raise ValueError("repeat and cross_layer are probabilities")
        if min(self.tokens, self.layers) < 1 or self.skew < 0:
            raise ValueError("tokens and layers must be positive and skew non-negative")


def zipf_popularity(experts: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """[E] probabilities, (rank + 1) ** -skew normalised, ranks randomly assigned to experts."""
    weights = np.arange(1, experts + 1, dtype=np.float64) ** -skew
    return (weights / weights.sum())[rng.permutation(experts)]


def sequence_ids(cfg: SyntheticTraceConfig) -> np.ndarray:
    """[N] sequence of each token."""
    per = cfg.tokens_per_sequence or cfg.tokens
    return (np.arange(cfg.tokens) // per).astype(np.int32)


def repeat_sources(repeat: float, sequence: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N] index of the token whose noise each token uses: itself, or the latest non-repeating one."""
    n = len(sequence)
    repeats = rng.random(n) < repeat                              # [N]
    repeats[0] = False
    repeats[1:] &= sequence[1:] == sequence[:-1]                  # a sequence's first token is fresh
    own = np.where(repeats, 0, np.arange(n))
    return np.maximum.accumulate(own)


def synthetic_trace(cfg: SyntheticTraceConfig) -> Trace:
    """A Trace with expert_ids [N, L, k], router_probs [N, L, E] (float16), sequence, decode."""
    rng = np.random.default_rng(cfg.seed)
    n, e = cfg.tokens, cfg.experts
    sequence = sequence_ids(cfg)
    position = np.arange(n) - np.searchsorted(sequence, sequence)  # [N] position within its sequence
    logits = np.empty((n, cfg.layers, e), dtype=np.float32)        # [N, L, E]
    noise = None
    for layer in range(cfg.layers):
        fresh = rng.gumbel(size=(n, e))                            # [N, E]
        if noise is not None and cfg.cross_layer > 0:
            follow = rng.random(n) < cfg.cross_layer               # [N]
            fresh[follow] = noise[follow][:, rng.permutation(e)]
        noise = fresh[repeat_sources(cfg.repeat, sequence, rng)]   # [N, E]
        logits[:, layer] = np.log(zipf_popularity(e, cfg.skew, rng)) + noise
    expert_ids = np.argsort(-logits, axis=2, kind="stable")[:, :, : cfg.top_k]   # [N, L, k]
    probs = np.exp(logits - logits.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    meta = {"model": "synthetic", "synthetic": dataclasses.asdict(cfg)}
    return Trace(expert_ids.astype(np.int16), probs.astype(np.float16), sequence, position >= cfg.prompt_tokens,
                 None, meta)
