"""Choosing the CPU backend (Numba kernels or torch) per expert format and token count, by measurement.

    # H = hidden, I = intermediate, T = tokens
    BUCKETS = (1, 4, 16, 64, 256): a job of T tokens uses the choice of the first bucket >= T (the last
    bucket for more). Each bucket is timed on one expert of the model's shape (capped to MAX_PARAMS
    weights so that a measurement stays short) with random weights in the format's layout.

The Numba kernels stream the weights once and win at few tokens; torch (oneDNN) wins at many tokens
on CPUs with AVX-512 BF16 or AMX. Which one wins where depends on the CPU, so it is measured.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .blocks import as_numpy_block
from .formats import FORMATS
from .packed import NATIVE, ExpertFormat, canonical_expert_format

BUCKETS = (1, 4, 16, 64, 256)
BACKENDS = ("numba", "torch")
# Weights (3 * H * I) of the expert a measurement times; larger experts are measured with a smaller I.
MAX_PARAMS = 4_000_000
# Bytes of distinct expert copies a measurement cycles through, so that weights come from DRAM as in use.
COPIES_BYTES = 64 << 20
# Torch is timed no further when its first call takes this many times Numba's median.
GIVE_UP = 4.0


def bucket_of(tokens: int) -> int:
    """The bucket whose choice serves a job of ``tokens`` tokens."""
    return next((b for b in BUCKETS if tokens <= b), BUCKETS[-1])


def measured_shape(hidden: int, inter: int, max_params: int = MAX_PARAMS) -> tuple[int, int]:
    """(H, I) of the expert to time: the model's, with I (then H) reduced to keep 3 * H * I <= max_params
    (kept even, as int4 needs)."""
    if 3 * hidden * inter <= max_params:
        return hidden, inter
    inter = max(2, max_params // (3 * hidden) // 2 * 2)
    if 3 * hidden * inter > max_params:
        hidden = max(2, max_params // (3 * inter) // 2 * 2)
    return hidden, inter


@dataclass(frozen=True)
class SampleExpert:
    """One expert of random weights in a format: what CpuJob needs (block, scales, fmt) and its bytes."""

    block: np.ndarray
    scales: np.ndarray | None
    fmt: ExpertFormat | None

    @property
    def nbytes(self) -> int:
        return self.block.nbytes + (0 if self.scales is None else self.scales.nbytes)


def job_format(block: np.ndarray, fmt: ExpertFormat | None) -> str:
    """Format name of a job's weights: the packed format's, or the native block's dtype (int8 blocks: int8)."""
    if fmt is not None and fmt.packed:
        return fmt.name
    name = FORMATS.get(block.dtype)
    if name is None:
        raise ValueError(f"expert block dtype {block.dtype} is not a CPU kernel format")
    return name


def sample_expert(name: str, hidden: int, inter: int, seed: int = 0,
                  compute_dtype: torch.dtype = torch.float32) -> SampleExpert:
    """Random weights ~ N(0, 1/K) in format ``name`` (packed formats: quantized with ExpertFormat.write,
    without the int4 zero-point refinement's cost mattering at these sizes), computed in ``compute_dtype``
    (the model's: the torch backend dequantizes int4 into it)."""
    name = canonical_expert_format(name)
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(2 * inter, hidden, generator=gen) / math.sqrt(hidden)
    down = torch.randn(hidden, inter, generator=gen) / math.sqrt(inter)
    if name in NATIVE:
        block = torch.cat([gate_up.reshape(-1), down.reshape(-1)]).to(NATIVE[name])
        return SampleExpert(as_numpy_block(block), None, None)
    fmt = ExpertFormat(name, hidden, inter, compute_dtype)
    row = torch.zeros(fmt.row_numel, dtype=torch.uint8)
    if fmt.group:          # random codes and fixed scales: the HQQ fit is slow and irrelevant to timing
        return SampleExpert(_random_int4_row(fmt, gen), None, fmt)
    fmt.write(row, "gate_up", gate_up)
    fmt.write(row, "down", down)
    return SampleExpert(row.numpy(), None, fmt)


def sample_copies(name: str, hidden: int, inter: int, compute_dtype: torch.dtype = torch.float32) -> list[SampleExpert]:
    """One sample expert and distinct copies of it, COPIES_BYTES in all (at least two)."""
    expert = sample_expert(name, hidden, inter, compute_dtype=compute_dtype)
    count = max(2, math.ceil(COPIES_BYTES / expert.nbytes))
    return [expert] + [SampleExpert(expert.block.copy(), expert.scales, expert.fmt) for _ in range(count - 1)]


def _random_int4_row(fmt: ExpertFormat, gen: torch.Generator) -> np.ndarray:
    """An int4 row of uniform random codes, scale 1 / (8 sqrt(K)) and zero 7.5 (weights ~ U(-1, 1) / sqrt(K))."""
    row = torch.randint(0, 256, (fmt.row_numel,), generator=gen, dtype=torch.uint8)
    views = fmt.views(row)
    for matrix, width in (("gate_up", fmt.hidden), ("down", fmt.inter)):
        views[f"{matrix}_scale"].fill_(1.0 / (7.5 * math.sqrt(width)))
        views[f"{matrix}_zero"].fill_(7.5)
    return row.numpy()


def alternated_medians(fns: dict[str, Callable[[], None]], budget_s: float, min_runs: int = 3, max_runs: int = 15,
                       give_up: float = GIVE_UP) -> dict[str, float]:
    """{name: median seconds of fns[name]()}, the functions called in turn, round after round, so that a drift in
    the machine's speed (its memory bandwidth can move by half within seconds) weighs on every one alike; timed
    one after the other, the later ones met a different machine. One warm-up call each first; as many rounds
    as fit in ``budget_s`` (within limits). A function whose warm-up call takes ``give_up`` times the fastest
    warm-up is timed no further (its warm-up time is returned: it cannot win)."""
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = max(time.perf_counter() - start, 1e-9)
    fastest = min(first.values())
    timed = [name for name in fns if first[name] <= give_up * fastest]
    rounds = max(min_runs, min(max_runs, int(budget_s / sum(first[name] for name in timed))))
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(rounds):
        for name in timed:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(times[name])) if name in times else first[name] for name in fns}


def pick(timings: dict[int, dict[str, float]]) -> dict[int, str]:
    """{bucket: {backend: seconds}} -> {bucket: the faster backend} (Numba on a tie)."""
    return {b: min(BACKENDS, key=lambda name: (t[name], name != "numba")) for b, t in timings.items()}


def time_buckets(run, hidden: int, share: float) -> dict[int, dict[str, float]]:
    """{bucket: {backend: median seconds}}: ``run(x [T, H], backend)`` timed for T in BUCKETS, the backends
    alternated (``alternated_medians``), about ``share`` seconds per (bucket, backend); a backend whose first call
    is clearly slower is timed no further (GIVE_UP)."""
    timings = {}
    for tokens in BUCKETS:
        xs = np.random.default_rng(tokens).standard_normal((tokens, hidden)).astype(np.float32)   # [T, H]
        timings[tokens] = alternated_medians({b: partial(run, xs, b) for b in BACKENDS}, 2 * share)
    return timings
