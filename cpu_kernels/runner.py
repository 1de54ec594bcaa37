"""CpuRunner: routed experts on CPU on a background thread, overlapping the caller's GPU work.

    # T = tokens, H = hidden, I = intermediate, n = tokens routed to one expert
    hidden [T, H] float32 ; job = (expert block, rows [n], routing weights [n], act)
    result [T, H] float32 = sum over jobs of index_add(rows, weights[:, None] * expert(hidden[rows]))

Rows no job touches stay zero, so the caller adds the result to its GPU-side sum (or
index_adds it). The numba kernels release the GIL, so the caller keeps running meanwhile.

Shared cores: numba's OpenMP threads spin at each barrier by default. When the cores are
oversubscribed (a busy caller thread plus num_threads == cores, or other processes) a
preempted thread can stall a kernel for a whole scheduler time slice (~30 ms measured on a
2-core machine, against ~1 ms of work). Start the process with OMP_WAIT_POLICY=PASSIVE
(libgomp reads it once, at load) or use fewer threads than cores in that case.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numba
import numpy as np
import torch

from .backends import (BACKENDS, BUCKETS, alternated_medians, bucket_of, job_format, measured_shape, pick, sample_copies,
                       sample_expert, time_buckets)
from .blocks import infer_inter
from .ffn import check_act, check_weights, expert_ffn
from .packed import ExpertFormat, canonical_expert_format
from .packed_ffn import check_packed, packed_ffn, packed_scratch_size, row_buffer_width
from .rows import gather_rows, scatter_add_rows
from .torch_backend import TorchExperts
from .workspace import Workspace

# Shapes used to compile every kernel variant at warmup (int4 needs even sizes; T = 5 runs every tail loop).
_WARMUP_HIDDEN, _WARMUP_INTER, _WARMUP_TOKENS = 10, 6, 5
FIRST_USE_S = 0.02      # seconds to time each backend of a GGUF expert the first time its token bucket is seen


@dataclass(frozen=True)
class CpuJob:
    """One routed expert: its weight block, the token rows it serves and their routing weights.

    block: 1-D numpy block (float32 / float16 / uint16 bf16 bits / int8 with `scales`), or, with
    `fmt` (a packed ExpertFormat), the expert's packed uint8 row.
    rows: [n] token indices into the runner's hidden [T, H]; weights: [n] routing weights.
    """

    block: np.ndarray
    rows: np.ndarray
    weights: np.ndarray
    act: str = "silu"
    scales: np.ndarray | None = None
    fmt: ExpertFormat | None = None


def _as_float32_2d(array, name: str) -> np.ndarray:
    """numpy or CPU torch float32 [T, H] contiguous -> numpy (a view, no copy)."""
    if isinstance(array, torch.Tensor):
        if array.device.type != "cpu":
            raise ValueError(f"{name} must be in host memory, got a tensor on {array.device}")
        array = array.detach().numpy()
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {getattr(array, 'dtype', type(array).__name__)}")
    if array.ndim != 2 or not array.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous [T, H] array, got shape {list(array.shape)}")
    return array


def _check_job(job: CpuJob, tokens: int, hidden: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Validate a job; returns (rows int64, weights float32, inter, act code)."""
    if job.fmt is not None and job.fmt.packed:
        inter = check_packed(job.block, job.fmt, hidden)
    else:
        inter = infer_inter(job.block, hidden)
        check_weights(job.block, job.scales, hidden, inter)
    rows = np.ascontiguousarray(job.rows, dtype=np.int64)
    weights = np.ascontiguousarray(job.weights, dtype=np.float32)
    if rows.ndim != 1 or weights.shape != rows.shape:
        raise ValueError(f"job rows {list(rows.shape)} and weights {list(weights.shape)} must be matching 1-D")
    if rows.size and (rows.min() < 0 or rows.max() >= tokens):
        raise ValueError(f"job rows must lie in [0, {tokens}); got min {rows.min()}, max {rows.max()}")
    return rows, weights, inter, check_act(job.act)


class CpuRunner:
    """Runs expert jobs on one background worker thread with `num_threads` numba threads.

    submit() returns a concurrent.futures.Future; the arrays given to it must stay unchanged
    until the future is done. Buffers are pooled in the runner and reused across calls.
    """

    def __init__(self, num_threads: int | None = None) -> None:
        self._num_threads = self._check_threads(num_threads or numba.config.NUMBA_NUM_THREADS)
        self._workspace = Workspace()
        self._torch = TorchExperts()
        self._choices: dict[str, dict[int, str]] = {}
        self.timings: dict[str, dict[int, dict[str, float]]] = {}   # the last measure_backends()
        self.measured_shape: tuple[int, int] | None = None          # (H, I) it timed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-cpu-experts")
        self._worker_threads = 0  # numba threads last set in the worker thread

    @staticmethod
    def _check_threads(num_threads: int) -> int:
        """1 <= num_threads <= NUMBA_NUM_THREADS (numba cannot grow its pool at run time)."""
        limit = numba.config.NUMBA_NUM_THREADS
        if not 1 <= int(num_threads) <= limit:
            raise ValueError(f"num_threads must be in [1, {limit}] (NUMBA_NUM_THREADS), got {num_threads}")
        return int(num_threads)

    @property
    def num_threads(self) -> int:
        """numba threads each job's kernels use."""
        return self._num_threads

    def set_num_threads(self, num_threads: int) -> None:
        """Change the numba thread count for jobs submitted from now on."""
        self._num_threads = self._check_threads(num_threads)

    def submit(self, hidden, jobs: Sequence[CpuJob], out=None) -> Future:
        """Queue jobs over hidden [T, H]; the future's result is `out` (or a new float32 [T, H]).

        `out` (numpy or CPU torch float32 [T, H]) is overwritten with the weighted sum.
        Inputs are validated here, so bad input raises ValueError in the caller.
        """
        x = _as_float32_2d(hidden, "hidden")
        tokens, width = x.shape
        result = np.zeros((tokens, width), dtype=np.float32) if out is None else out
        acc = _as_float32_2d(result, "out")
        if acc.shape != x.shape:
            raise ValueError(f"out has shape {list(acc.shape)}, hidden has {list(x.shape)}")
        checked = [(job, *_check_job(job, tokens, width)) for job in jobs]
        threads = self._num_threads
        return self._executor.submit(self._run_jobs, x, checked, acc, result, out is None, threads)

    def run(self, hidden, jobs: Sequence[CpuJob], out=None):
        """submit() and wait: the weighted sum of the jobs' outputs."""
        return self.submit(hidden, jobs, out).result()

    def _set_worker_threads(self, threads: int) -> None:
        """numba's thread count is per calling thread: set it in the worker when it changes."""
        if self._worker_threads != threads:
            numba.set_num_threads(threads)
            self._worker_threads = threads

    def _run_jobs(self, x, checked, acc, result, zeroed, threads):
        """Worker thread body: gather rows, run each expert, index_add its weighted output."""
        self._set_worker_threads(threads)
        if not zeroed:
            acc.fill(0.0)
        width = x.shape[1]
        for job, rows, weights, inter, code in checked:
            n = rows.size
            if n == 0:
                continue
            xs = self._workspace.get("x", n, width)  # [n, H]
            ys = self._workspace.get("y", n, width)  # [n, H]
            hs = self._workspace.get("h", n, inter)  # [n, I]
            gather_rows(x, rows, xs)
            if job.fmt is None or job.fmt.numba:
                backend = self.backend(job_format(job.block, job.fmt), n)
            elif getattr(job.fmt, "storage", None) == "gguf":
                backend = self._first_use_backend(job, xs, ys, hs, inter, code)
            else:
                backend = "torch"
            self._run_expert(job, xs, ys, hs, inter, code, backend)
            scatter_add_rows(acc, rows, weights, ys)
        return result

    def _run_expert(self, job: CpuJob, xs, ys, hs, inter: int, code: int, backend: str) -> None:
        """ys [n, H] = the job's expert on xs [n, H] with ``backend`` (hs: the [n, I] kernel scratch)."""
        packed = job.fmt is not None and job.fmt.packed
        if backend == "numba" and getattr(job.fmt, "storage", None) == "gguf":
            scratch = self._workspace.get("packed", 1, 2 * xs.shape[0] * inter)
            job.fmt.ffn_numba(xs, job.block, code, ys, scratch)
        elif backend == "torch":
            self._torch.run(xs, job.block, inter, code, ys, job.scales, job.fmt if packed else None)
        elif packed:
            rows = self._workspace.get("rows", self._num_threads, row_buffer_width(job.fmt))
            scratch = self._workspace.get("packed", 1, packed_scratch_size(job.fmt, xs.shape[0]))
            packed_ffn(xs, job.block, job.fmt, code, ys, scratch, rows)
        else:
            expert_ffn(xs, job.block, xs.shape[1], inter, code, ys, hs, job.scales)

    # -- backend choice --------------------------------------------------------------------------------------------
    def _first_use_backend(self, job: CpuJob, xs, ys, hs, inter: int, code: int) -> str:
        """A GGUF expert's backend for this token bucket: timed on the job itself the first time a bucket of its
        types is seen (the fused Numba kernel vs dequantize-then-matmul), then kept (in ``choices`` and
        ``timings`` under the format's kernel_key). Worker thread only."""
        key, bucket = job.fmt.kernel_key, bucket_of(xs.shape[0])
        chosen = self._choices.setdefault(key, {})
        if bucket not in chosen:
            timings = alternated_medians({b: partial(self._run_expert, job, xs, ys, hs, inter, code, b)
                                          for b in BACKENDS}, 2 * FIRST_USE_S, min_runs=1)
            self.timings.setdefault(key, {})[bucket] = timings
            chosen[bucket] = pick({bucket: timings})[bucket]
        return chosen[bucket]

    def backend(self, fmt: str, tokens: int) -> str:
        """"numba" or "torch": the backend a job of ``tokens`` tokens in format ``fmt`` runs on (Numba
        until measure_backends() or set_choices() says otherwise). ``fmt``: a format name or alias ("bf16")."""
        per = self._choices.get(fmt)
        if per is None:
            per = self._choices.get(canonical_expert_format(fmt), {})
        return per.get(bucket_of(tokens), "numba")

    @property
    def choices(self) -> dict[str, dict[int, str]]:
        """{format: {token bucket: backend}} in use (a copy)."""
        return {fmt: dict(per) for fmt, per in self._choices.items()}

    def set_choices(self, choices: dict[str, dict[int, str]]) -> None:
        """Use these {format: {bucket: "numba" | "torch"}} choices (e.g. read back from a hardware profile)."""
        for fmt, per in choices.items():
            bad = {b: v for b, v in per.items() if int(b) not in BUCKETS or v not in ("numba", "torch")}
            if bad:
                raise ValueError(f"backend choices for {fmt}: {bad} are not {{bucket in {BUCKETS}: 'numba' | 'torch'}}")
            self._choices[canonical_expert_format(fmt)] = {int(b): v for b, v in per.items()}

    def measure_backends(self, hidden: int, inter: int, formats: Sequence[str], act: str = "silu",
                         budget_s: float = 2.0, compute_dtype: torch.dtype = torch.float32
                         ) -> dict[str, dict[int, dict[str, float]]]:
        """Time Numba and torch for each format and token bucket on one expert of the model's (H, I) (capped,
        see backends.measured_shape) and compute dtype (packed formats: what torch dequantizes into), keep the
        faster per bucket, and return {format: {bucket: {backend: seconds}}} (also kept in ``timings``, with
        the measured shape in ``measured_shape``).

        ``budget_s``: about the total time spent timing (the warm-up compile not included)."""
        hidden, inter = measured_shape(hidden, inter)
        self.measured_shape = (hidden, inter)
        names = [canonical_expert_format(name) for name in formats]
        share = budget_s / max(1, len(names) * len(BUCKETS) * 2)
        for name in names:
            experts = sample_copies(name, hidden, inter, compute_dtype)
            timings = self._executor.submit(self._time_format, experts, hidden, inter, act, share).result()
            self.timings[name] = timings
            self._choices[name] = pick(timings)
        return {name: self.timings[name] for name in names}

    def _time_format(self, experts, hidden: int, inter: int, act: str, share: float) -> dict[int, dict[str, float]]:
        """Worker thread: {bucket: {backend: median seconds}} of one format, cycling through its expert copies."""
        self._set_worker_threads(self._num_threads)
        code = check_act(act)
        rows, weights = np.zeros(1, np.int64), np.ones(1, np.float32)
        jobs = itertools.cycle([CpuJob(e.block, rows, weights, act, e.scales, e.fmt) for e in experts])

        def run(xs: np.ndarray, backend: str) -> None:
            ys = self._workspace.get("y", xs.shape[0], hidden)
            hs = self._workspace.get("h", xs.shape[0], inter)
            self._run_expert(next(jobs), xs, ys, hs, inter, code, backend)

        return time_buckets(run, hidden, share)

    def reserve(self, max_tokens: int, hidden: int, inter: int) -> None:
        """Allocate the pooled buffers for up to max_tokens rows per job now (call before submitting)."""
        for name, width in (("x", hidden), ("y", hidden), ("h", inter)):
            self._workspace.reserve(name, max_tokens * width)

    def warmup(
        self,
        dtypes: Sequence = ("float32", "float16", "bfloat16"),
        acts: Sequence[str] = ("silu",),
        int8: bool = False,
        packed: Sequence[str] = (),
    ) -> None:
        """Compile (or load from numba's cache) every kernel variant now, in the worker thread.

        dtypes: weight formats to prepare ("bf16", "bfloat16", torch.bfloat16, "int8", ...);
        packed: packed expert formats to prepare ("int8", "int4", "int4-g32", "int4-g128", "fp8"); int8=True
        also prepares the int8 kernels. Runs the decode (T = 1) and prefill (T > 1) paths for each
        format and activation, so no compilation happens at the first token.
        """
        names = {canonical_expert_format(name) for name in (*dtypes, *packed)} | ({"int8"} if int8 else set())
        jobs = []
        for name in sorted(names):
            expert = sample_expert(name, _WARMUP_HIDDEN, _WARMUP_INTER)
            jobs += self._warmup_jobs(expert, acts)
        self.run(np.ones((_WARMUP_TOKENS, _WARMUP_HIDDEN), dtype=np.float32), jobs)

    @staticmethod
    def _warmup_jobs(expert, acts) -> list[CpuJob]:
        """A decode job (1 row) and a prefill job (all rows) per activation."""
        one, many = np.zeros(1, np.int64), np.arange(_WARMUP_TOKENS)
        return [
            CpuJob(expert.block, rows, np.ones(rows.size, np.float32), act, expert.scales, expert.fmt)
            for act in acts
            for rows in (one, many)
        ]

    def close(self) -> None:
        """Stop the worker thread after the queued jobs finish."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "CpuRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
