"""Fit a LearnedCorrection on a trace with gate inputs: closed-form ridge regression per (layer, distance).

N = traced tokens, n = tokens in a chunk, F = features of the source layer, E = experts per layer,
H = hidden size, L = MoE layers

For source layer l and target layer t = l + d the targets are layer t's true
router logits ``y = W_t g_t`` [E] (recomputed from the trace's gate inputs).
The map is ``y ~ x (A + S) + b``: ``A`` [F, E] is the cross-layer gate
(``diag(w_t / w_l) W_t^T`` on layer l's gate input, zero on the other
features) and the residual ``S`` is fitted on standardised features
``z = (x - mu) / sigma`` with a ridge penalty ``lam * N * |S_z|^2`` (the
intercept is free), so lam -> infinity gives back the cross-layer gate.

The fit only keeps sums over tokens (x, x x^T, y, x y^T), accumulated in
chunks, so traces of any length fit in memory. ``lam`` is chosen per
(layer, distance) by top-k recall on the trace's held-out sequences (every
``validation_every``-th), then the map is refitted on all of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
import torch
from torch import Tensor

from .learned import LearnedCorrection, layer_block, router_fingerprint, source_features
from .metrics import topk_hits
from .routing import RouterParams, selection_scores
from .trace import Trace

CHUNK_TOKENS = 8192


@dataclass(frozen=True)
class CorrectionFitConfig:
    distances: tuple[int, ...] = (1, 2, 3)
    lambdas: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    feature_set: str = "layers"
    prior: str = "cross_layer"        # "cross_layer" (shrink towards the cross-layer gate) or "zero"
    validation_every: int = 5         # every n-th sequence of the fit trace validates lam


@dataclass
class Moments:
    """Sums over some tokens of features x [F] and targets y [E] (float64)."""

    rows: int
    sum_x: Tensor                     # [F]
    sum_xx: Tensor                    # [F, F]
    sum_y: Tensor                     # [E]
    sum_xy: Tensor                    # [F, E]

    @classmethod
    def of(cls, x: Tensor, y: Tensor) -> "Moments":
        return cls(x.shape[0], x.sum(0), x.T @ x, y.sum(0), x.T @ y)

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.rows + other.rows, self.sum_x + other.sum_x, self.sum_xx + other.sum_xx,
                       self.sum_y + other.sum_y, self.sum_xy + other.sum_xy)

    def targets(self, columns: slice) -> "Moments":
        """The same sums for some of the target columns."""
        return Moments(self.rows, self.sum_x, self.sum_xx, self.sum_y[columns], self.sum_xy[:, columns])


def ridge_map(m: Moments, prior: Tensor, mean: Tensor, scale: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """(weight [F, E], bias [E]) on raw features: ``prior`` [F, E] plus the ridge residual fitted on ``m``."""
    n, f = m.rows, prior.shape[0]
    centred_x = m.sum_x - n * mean                                                     # sum (x - mu)
    x_xt = m.sum_xx - torch.outer(mean, m.sum_x)                                       # sum (x - mu) x^T
    centred_xx = x_xt - torch.outer(centred_x, mean)                                   # sum (x - mu)(x - mu)^T
    centred_xr = m.sum_xy - torch.outer(mean, m.sum_y) - x_xt @ prior                  # sum (x - mu) r^T
    sum_r = m.sum_y - prior.T @ m.sum_x                                                # sum r, r = y - x A
    gram = torch.empty(f + 1, f + 1, dtype=prior.dtype)
    gram[:f, :f] = centred_xx / torch.outer(scale, scale)
    gram[:f, f] = gram[f, :f] = centred_x / scale
    gram[f, f] = n
    rhs = torch.cat([centred_xr / scale[:, None], sum_r[None]], dim=0)                 # [F+1, E]
    penalty = torch.full((f + 1,), lam * max(n, 1), dtype=prior.dtype)
    penalty[f] = 1e-9 * max(n, 1)
    residual = torch.linalg.solve(gram + torch.diag(penalty), rhs)                     # [F+1, E]
    slope = residual[:f] / scale[:, None]
    return prior + slope, residual[f] - mean @ slope


def fit_correction(trace: Trace, params: RouterParams, config: CorrectionFitConfig = CorrectionFitConfig()
                   ) -> LearnedCorrection:
    """Fit the maps of a LearnedCorrection on ``trace`` (which needs gate inputs)."""
    if trace.gate_inputs is None:
        raise ValueError("fitting a learned correction needs a trace recorded with gate inputs")
    fingerprint = router_fingerprint(params)
    params = params.to("cpu", torch.float64)
    held = (trace.sequence % config.validation_every) == config.validation_every - 1    # [N]
    maps, lambdas = {}, {}
    for source in range(trace.num_layers - 1):
        targets = [source + d for d in config.distances if source + d < trace.num_layers]
        fitted = fit_source(trace, params, source, targets, held, config)
        for target, (weight, bias, lam) in fitted.items():
            maps[source, target - source] = (weight.float(), bias.float())
            lambdas[f"{source}+{target - source}"] = lam
    meta = {"distances": list(config.distances), "lambdas": lambdas, "prior": config.prior,
            "fit_tokens": trace.num_tokens, "fit_sequences": int(len(np.unique(trace.sequence))),
            "model": PurePath(str(trace.meta.get("model", ""))).name, "model_type": trace.meta.get("model_type"),
            "fit_prompts": trace.meta.get("prompts"), "router_fingerprint": fingerprint}
    return LearnedCorrection(maps, trace.num_layers, trace.num_experts, config.feature_set, meta)


def fit_source(trace: Trace, params: RouterParams, source: int, targets: list[int], held: np.ndarray,
               config: CorrectionFitConfig) -> dict[int, tuple[Tensor, Tensor, float]]:
    """target -> (weight [F, E], bias [E], lam) for every map out of ``source``."""
    sums: dict[bool, Moments] = {}                                                      # held? -> sums
    for rows, x in feature_chunks(trace, source, config.feature_set):
        y = torch.cat([target_logits(trace, params, t, rows) for t in targets], dim=1)     # [n, E * targets]
        mask = torch.from_numpy(held[rows])
        for part in (False, True):
            m = Moments.of(x[mask == part], y[mask == part])
            sums[part] = sums[part] + m if part in sums else m
    experts = params.num_experts
    result = {}
    for i, t in enumerate(targets):
        columns = slice(i * experts, (i + 1) * experts)
        fit, total = sums[False].targets(columns), (sums[False] + sums[True]).targets(columns)
        mean = total.sum_x / total.rows
        scale = (total.sum_xx.diagonal() / total.rows - mean**2).clamp_min(0).sqrt()
        scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))
        prior = prior_map(params, source, t, mean.shape[0], config.prior)
        lam = choose_lambda(trace, params, source, t, held, fit, prior, mean, scale, config)
        result[t] = (*ridge_map(total, prior, mean, scale, lam), lam)
    return result


def choose_lambda(trace: Trace, params: RouterParams, source: int, target: int, held: np.ndarray, fit: Moments,
                  prior: Tensor, mean: Tensor, scale: Tensor, config: CorrectionFitConfig) -> float:
    """The lam whose map fitted on the fit rows finds the most true experts on the held rows (ties: larger lam)."""
    if fit.rows == 0 or not held.any():
        return config.lambdas[-1]
    candidates = [ridge_map(fit, prior, mean, scale, lam) for lam in config.lambdas]
    hits = np.zeros((len(candidates), 2), np.int64)                                     # top-k, top-2k hits
    k = trace.top_k
    for rows, x in feature_chunks(trace, source, config.feature_set, np.flatnonzero(held)):
        truth = torch.from_numpy(trace.expert_ids[rows, target].astype(np.int64))        # [n, k]
        for i, (weight, bias) in enumerate(candidates):
            scores = selection_scores(params, target, x @ weight + bias)                  # [n, E]
            hits[i] += [int(topk_hits(scores, truth, k).sum()), int(topk_hits(scores, truth, 2 * k).sum())]
    best = max(range(len(candidates)), key=lambda i: (hits[i, 0], hits[i, 1], i))
    return config.lambdas[best]


def feature_chunks(trace: Trace, source: int, feature_set: str, rows: np.ndarray | None = None
                   ) -> Iterator[tuple[np.ndarray, Tensor]]:
    """(row indices [n], features [n, F] float64) of source layer ``source``, CHUNK_TOKENS rows at a time."""
    rows = np.arange(trace.num_tokens) if rows is None else rows
    for start in range(0, len(rows), CHUNK_TOKENS):
        chunk = rows[start:start + CHUNK_TOKENS]
        layers = range(source + 1) if feature_set == "layers" else [source]
        blocks = [layer_block(feature_set, torch.from_numpy(trace.gate_inputs[chunk, j].astype(np.float64)),
                              torch.from_numpy(trace.expert_ids[chunk, j].astype(np.int64)),
                              torch.from_numpy(trace.router_probs[chunk, j].astype(np.float64))).double()
                  for j in layers]
        yield chunk, source_features(feature_set, blocks)


def target_logits(trace: Trace, params: RouterParams, target: int, rows: np.ndarray) -> Tensor:
    """[n, E] layer ``target``'s router logits, recomputed from the trace's gate inputs (float64)."""
    gate = torch.from_numpy(trace.gate_inputs[rows, target].astype(np.float64))          # [n, H]
    return gate @ params.weights[target].T


def prior_map(params: RouterParams, source: int, target: int, features: int, prior: str) -> Tensor:
    """[F, E] the cross-layer gate on the first H features (layer l's gate input), zero elsewhere."""
    result = torch.zeros(features, params.num_experts, dtype=torch.float64)
    if prior == "cross_layer":
        w_source = params.norm_weights[source]
        safe = torch.where(w_source.abs() < 1e-6, torch.full_like(w_source, 1e-6), w_source)
        ratio = params.norm_weights[target] / safe                                          # [H]
        result[:params.hidden_size] = ratio[:, None] * params.weights[target].T
    elif prior != "zero":
        raise ValueError(f"prior must be 'cross_layer' or 'zero', got {prior!r}")
    return result

