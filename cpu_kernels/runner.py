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

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numba
import numpy as np
import torch

from .blocks import infer_inter
from .ffn import check_act, check_weights, expert_ffn
from .formats import canonical_format
from .packed import ExpertFormat
from .packed_ffn import PackedExperts, check_packed
from .quant import quantize_block_int8
from .rows import gather_rows, scatter_add_rows
from .workspace import Workspace

# Shapes used to compile every kernel variant at warmup (odd sizes exercise every tail loop).
_WARMUP_HIDDEN, _WARMUP_INTER, _WARMUP_TOKENS = 10, 6, 5
_WARMUP_BLOCK_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


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
        self._packed = PackedExperts()
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
            if job.fmt is not None and job.fmt.packed:
                self._packed.run(job.fmt, job.block, xs, code, ys)
            else:
                expert_ffn(xs, job.block, width, inter, code, ys, hs, job.scales)
            scatter_add_rows(acc, rows, weights, ys)
        return result

    def reserve(self, max_tokens: int, hidden: int, inter: int) -> None:
        """Allocate the pooled buffers for up to max_tokens rows per job now (call before submitting)."""
        for name, width in (("x", hidden), ("y", hidden), ("h", inter)):
            self._workspace.reserve(name, max_tokens * width)

    def warmup(
        self,
        dtypes: Sequence = ("float32", "float16", "bfloat16"),
        acts: Sequence[str] = ("silu",),
        int8: bool = False,
    ) -> None:
        """Compile (or load from numba's cache) every kernel variant now, in the worker thread.

        dtypes: weight formats to prepare ("bf16", "bfloat16", torch.bfloat16, "int8", ...);
        int8=True also prepares the int8 kernels. Runs the decode (T = 1) and prefill (T > 1)
        paths for each format and activation, so no compilation happens at the first token.
        """
        formats = {canonical_format(name) for name in dtypes}
        if int8:
            formats.add("int8")
        hidden, inter = _WARMUP_HIDDEN, _WARMUP_INTER
        weights = np.full(3 * hidden * inter, 0.01, dtype=np.float32)
        jobs = []
        for fmt in sorted(formats):
            if fmt == "int8":
                jobs += self._warmup_jobs(*quantize_block_int8(weights, hidden, inter), acts)
            else:
                jobs += self._warmup_jobs(weights.astype(_WARMUP_BLOCK_DTYPES[fmt]), None, acts)
        self.run(np.ones((_WARMUP_TOKENS, hidden), dtype=np.float32), jobs)

    @staticmethod
    def _warmup_jobs(block, scales, acts) -> list[CpuJob]:
        """A decode job (1 row) and a prefill job (all rows) per activation."""
        one, many = np.zeros(1, np.int64), np.arange(_WARMUP_TOKENS)
        return [
            CpuJob(block, rows, np.ones(rows.size, np.float32), act, scales)
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
