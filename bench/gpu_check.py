"""One command that checks moe-offload on a fresh GPU machine and measures what its design relies on.

    pip install --no-deps -e . && python bench/gpu_check.py        # about 6 minutes (the caps: --help)
    python bench/gpu_check.py --dry-run                              # every section on the CPU, small shapes
    python bench/gpu_check.py --smoke --out /tmp/gpu-check           # the same, JSON into /tmp/gpu-check

Sections, in this order, each with a cap in seconds (listed by --help; their sum stays under --budget-s,
420 s by default, with a margin). A section checks its time between steps and stops at its cap with what
it has measured ('partial'); one that fails is recorded (error and traceback) and the rest still run.

  environment      torch / CUDA / driver versions, device name and memory, stream priority range, the pinning
                   path the host store took, Numba's threading layer, CPU model
  micro            expert-sized blocks (Mixtral-8x7B expert: 3 x 4096 x 14336 bf16 = 336 MiB): a non_blocking copy
                   from pinned memory returns to the host at once; write-after-write and write-after-read on ONE
                   slot under load give the host's checksums (raw torch streams, then the CopyEngine; raw-stream
                   controls without the waits show whether the test can see a race at all); tearing down with
                   prefetches in flight leaves no CUDA error
  calibrate        the hardware profile of this machine for the full-size expert shape (moe_offload's own
                   measure_profile: copy, device and CPU expert times), written beside the JSON; the sections
                   below that need costs use it
  cuda_tests       pytest -m cuda on the test files that hold CUDA tests, in a subprocess. The full-size
                   checkpoint (a 2-layer Mixtral-8x7B-shaped one, random weights drawn on the GPU) is written by
                   a background thread from here on, capped at 150 s; sections that time or count things
                   wait for it first (within their caps)
  parity           tiny-mixtral and tiny-deepseek in bf16 at 1 / half / all expert slots, cpu_experts auto /
                   never / always (costs from a shipped hardware profile), vs plain transformers: max abs and
                   relative logit error, 16 greedy tokens; once in fp32 for exactness
  host_syncs       synchronizing CUDA calls and packed readbacks per MoE layer call in decode
  chunk_size       a demand copy's wait behind queued prefetches for prefetch chunks of 8/16/32/64 MiB vs the
                   same copy on an idle link, and the prefetch train's throughput pumped back to back
  full_size        the full-size checkpoint: copy GB/s (bytes over the link's busy time) vs the pinned peak, ms
                   per decode token, hit rate, share of copy time hidden by compute
  host_wait        ms per decode step with CPU experts when the host spins on its readback events vs blocks
                   (OffloadConfig.host_wait), alternating; which is faster
  planner          the full-size checkpoint once for real (hybrid scheduler, cross-layer prefetch, costs from
                   this run's profile) and its routing once through the simulator with the same settings:
                   measured vs projected decode tokens/s, the planner's error
  e2e              bench/e2e_gpu.py on the full-size checkpoint with its own routing (no trace), three designs,
                   in a subprocess

Writes gpu-check-<device>.json (and hardware-<device>.yaml) into --out (default bench/results/) after
every section, so a run that is killed keeps what it measured; prints a table: section, status, seconds,
cap, headline, and the sum. --dry-run (or --smoke) runs every section on the CPU with small shapes (the
deferred copy backend, tiny models, a full-size stand-in with tiny-mixtral's widths) under the same caps,
into a temporary folder unless --out is given; what needs CUDA is noted as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import gc
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import moe_offload  # noqa: E402
from moe_offload.runtime.tracing import TraceRecorder  # noqa: E402
from moe_offload.transfer import CopyEngine, ExpertShape, HostExpertStore  # noqa: E402

from common import (  # noqa: E402
    RESULTS,
    close_offloaded,
    cpu_info,
    device_name,
    machine,
    median,
    print_table,
    write_json,
)

MIB = 2**20
MIXTRAL_EXPERT = ExpertShape(hidden=4096, intermediate=14336)   # 3 * 4096 * 14336 bf16 = 336 MiB
DRY_EXPERT = ExpertShape(hidden=64, intermediate=96)             # 36 KiB
CHUNKS = (8, 16, 32, 64)                                         # MiB (KiB in a dry run)
SHIPPED = ("tiny-mixtral", "tiny-deepseek")
SHIPPED_PROFILE = "rtx4090-pcie4"                                # parity's costs: any profile, parity must hold
MODES = ("auto", "never", "always")
BF16_TOL, FP32_TOL = 3e-2, 1e-5                                  # relative logit error (norm ratio)
FULL_PRESET, FULL_LAYERS = "mixtral-8x7b", 2
BUILD_CAP_S = 150.0                                              # the background checkpoint build stops here
BUDGET_S = 420.0


# -- the run: budget, sections, report ---------------------------------------------------------------
class CheckpointBuild:
    """The full-size checkpoint, written by a background thread (weights drawn on the GPU) while other
    sections run, into a temporary folder renamed when complete; stopped at ``cap_s`` after its start.
    A dry run writes tiny-mixtral's widths with the full-size depth. ``given``: an existing checkpoint
    (else one left in --scratch by an earlier run is used)."""

    def __init__(self, check: "Check", given: str | None):
        self.check = check
        name = f"{'tiny-mixtral' if check.dry else FULL_PRESET}-l{FULL_LAYERS}"
        self.path = Path(given) if given else check.scratch / name
        self.ready = self.path.is_dir()      # only a complete build is renamed to this name
        self.error: str | None = None
        self.seconds: float | None = None
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, cap_s: float = BUILD_CAP_S) -> None:
        if self.ready or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._write, name="checkpoint-build", daemon=True)
        self._thread.start()
        timer = threading.Timer(cap_s, self.stop.set)
        timer.daemon = True
        timer.start()

    def _write(self) -> None:
        from full_size import write_random

        check, start = self.check, time.monotonic()
        partial = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)   # an earlier run's, stopped part-way
        try:
            if check.cuda:   # its own stream: no wait on the sections' work, and theirs none on it
                with torch.cuda.stream(torch.cuda.Stream(device=check.device)):
                    write_random(full_config(check), partial, 4.0, str(check.device), self.stop, "full-size")
            else:
                write_random(full_config(check), partial, 4.0, "cpu", self.stop, "full-size stand-in")
            partial.rename(self.path)
            self.ready = True
        except Exception as err:  # noqa: BLE001 - reported by the sections that wanted it
            self.error = f"{type(err).__name__}: {err}"
            shutil.rmtree(partial, ignore_errors=True)
        finally:
            self.seconds = round(time.monotonic() - start, 1)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the build; True once the checkpoint is there."""
        if self._thread is not None:
            self._thread.join(max(0.0, seconds))
        return self.ready

    def describe(self) -> dict:
        return {"checkpoint": str(self.path), "ready": self.ready, "build_s": self.seconds, "build_error": self.error,
                "built_here": self._thread is not None}


def full_config(check: "Check"):
    """The full-size checkpoint's config: Mixtral-8x7B with 2 layers, or (dry run) tiny-mixtral's with 2."""
    from full_size import preset_config, smoke_config

    if check.dry:
        config = smoke_config(torch.bfloat16)
        config.num_hidden_layers = FULL_LAYERS
        return config
    return preset_config(FULL_PRESET, FULL_LAYERS, torch.bfloat16)


class Check:
    """What every section sees: arguments, device, time left, a scratch folder, the output folder, the
    background checkpoint build, results to share."""

    def __init__(self, args: argparse.Namespace, out_dir: Path):
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else args.device)
        self.cuda = self.device.type == "cuda"
        self.slug = "cpu-dry-run" if self.dry else device_name(str(self.device))
        self.out_dir = out_dir
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.section_deadline = self.deadline
        self.scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.build = CheckpointBuild(self, args.checkpoint)
        self.shared: dict = {}   # e.g. the calibrated profile, the all-resident decode time

    def left(self) -> float:
        """Seconds left to the current section."""
        return min(self.section_deadline, self.deadline) - time.monotonic()

    def has(self, seconds: float) -> bool:
        return self.left() > seconds

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def full_checkpoint(self, reserve_s: float) -> tuple[Path, str | None]:
        """The full-size checkpoint, waiting for its build while more than ``reserve_s`` of the section is
        left; else tiny-mixtral, with a note saying why."""
        from moe_offload.loading.checkpoint import resolve_model_dir

        self.build.start()   # a no-op once started (by cuda_tests, unless only some sections run)
        if self.build.wait(self.left() - reserve_s):
            return self.build.path, None
        why = self.build.error or ("still being written" if self.build.running() else "not built")
        return resolve_model_dir("tiny-mixtral"), f"full-size checkpoint {why}: ran on tiny-mixtral instead"

    @property
    def expert(self) -> ExpertShape:
        """The full-size checkpoint's expert shape."""
        config = full_config(self)
        return ExpertShape(config.hidden_size, config.intermediate_size)


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Check], dict]
    cap_s: float          # the most seconds it may take
    min_s: float          # not started with less than this left
    quiet: bool = False   # times or counts things: waits (within its cap) for the background build first


def run_section(check: Check, section: Section) -> dict:
    left = check.deadline - time.monotonic()
    if left < section.min_s:
        return {"status": "skipped", "seconds": 0.0, "cap_s": section.cap_s,
                "note": f"time budget: {left:.0f} s left, the section needs at least {section.min_s:.0f} s"}
    check.section_deadline = time.monotonic() + min(section.cap_s, left)
    start = time.monotonic()
    busy = section.quiet and not check.build.wait(check.left() - section.min_s) and check.build.running()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = section.run(check)
            data.setdefault("status", "ok")
        except Exception as err:  # noqa: BLE001 - recorded; the next section still runs
            data = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                    "headline": f"{type(err).__name__}: {str(err)[:80]}", "traceback": traceback.format_exc()[-6000:]}
    if busy:
        data["build_running"] = "the checkpoint build was still running: timings may be disturbed"
    if caught:
        data["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})[:10]
    gc.collect()
    if check.cuda:
        try:
            torch.cuda.synchronize(check.device)   # a sticky CUDA error shows here, next to its section
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001
            data["status"] = "failed"
            data["cuda_error_after"] = f"{type(err).__name__}: {err}"
    data["seconds"] = round(time.monotonic() - start, 2)
    data["cap_s"] = section.cap_s
    return data


def start_watchdog(check: Check, report: dict, out: Path) -> threading.Timer:
    """Past the budget plus a grace period, write what there is and exit (a hung CUDA call cannot
    be interrupted any other way); faulthandler is the last resort if the GIL is held."""
    hard = check.args.budget_s + check.args.grace_s

    def fire() -> None:
        report["watchdog"] = f"run exceeded {hard:.0f} s during section {report.get('current')!r}; exited"
        try:
            write_json(out, json.loads(json.dumps(report, default=str)))
        finally:
            print(report["watchdog"], flush=True)
            os._exit(3)

    timer = threading.Timer(hard, fire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(hard + 20, exit=True)
    return timer


# -- shared helpers ----------------------------------------------------------------------------------
def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def expert_shape(check: Check) -> ExpertShape:
    return DRY_EXPERT if check.dry else MIXTRAL_EXPERT


def random_store(check: Check, blocks: int) -> tuple[HostExpertStore, np.ndarray]:
    """A pinned store of ``blocks`` expert blocks of random bytes, and each block's host checksum
    (sum of its int32 words, in int64: exact, and any torn or stale copy changes it)."""
    store = HostExpertStore(1, blocks, expert_shape(check), torch.bfloat16, pin=check.cuda)
    words = store.blocks.view(torch.int32)                                    # [B, 3HI/2]
    gen = torch.Generator(device=check.device).manual_seed(0)
    for b in range(blocks):   # random on the device (fast), then down into the host store
        words[b].copy_(torch.randint(-2**31, 2**31 - 1, (words.shape[1],), dtype=torch.int32,
                                     device=check.device, generator=gen))
    check.sync()
    sums = np.array([np.sum(words[b].numpy(), dtype=np.int64) for b in range(blocks)])
    return store, sums


def checksum(slot: torch.Tensor) -> torch.Tensor:
    """Device-side int64 sum of the slot's int32 words (queued on the current stream, no host sync)."""
    return slot.view(torch.int32).sum(dtype=torch.int64)


def compute_load(check: Check, ms: float) -> Callable[[], None]:
    """A kernel that keeps the compute stream busy for about ``ms`` (delays the slot's reader)."""
    if not check.cuda:
        return lambda: None
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(1000)      # the first call loads the kernel's module: keep it out of the timing
        check.sync()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(1_000_000)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        cycles = int(1_000_000 * ms / max(median(times), 1e-3))
        return lambda: torch.cuda._sleep(cycles)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=check.device)
    return lambda: [a @ a for _ in range(4)]


# -- environment -------------------------------------------------------------------------------------
def cpu_model() -> str:
    return cpu_info().get("cpu_model") or platform.processor() or platform.machine()


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except OSError:
        return None


def numba_threading() -> dict:
    """Run a parallel Numba kernel, then ask which threading layer it got."""
    import numba
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def parallel_sum(x):
        total = 0.0
        for i in prange(x.shape[0]):
            total += x[i]
        return total

    assert parallel_sum(np.ones(100_000)) == 100_000.0
    return {"numba_threading_layer": numba.threading_layer(), "numba_threads": numba.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}}


def pinning_path(check: Check) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = HostExpertStore(1, 2, ExpertShape(256, 512), torch.bfloat16, pin=check.cuda)
    got = {"pinning": store.pinning, "pinning_warnings": [str(w.message) for w in caught]}
    if check.cuda:
        got["is_pinned"] = bool(store.blocks.is_pinned())
    store.close()
    store.close()
    got["after_close"] = store.pinning
    return got


def environment(check: Check) -> dict:
    data = {"machine": machine(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "python": sys.version.split()[0], "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "packages": {p: version(p) for p in ("transformers", "numba", "numpy", "safetensors", "accelerate",
                                                  "cupy-cuda12x", "cupy-cuda13x", "moe-offload")}}
    if check.cuda:
        props = torch.cuda.get_device_properties(check.device)
        free, total = torch.cuda.mem_get_info(check.device)
        data |= {"device_name": props.name, "device_memory_gib": round(total / 2**30, 1),
                 "device_free_gib": round(free / 2**30, 1), "capability": f"{props.major}.{props.minor}",
                 "multiprocessors": props.multi_processor_count, "driver": driver_version(),
                 "stream_priority_range": list(torch.cuda.Stream.priority_range())}
    else:
        data["note"] = "dry run: no CUDA device; device fields omitted"
    data |= pinning_path(check)
    data |= numba_threading()
    device = data.get("device_name", "cpu")
    data["headline"] = (f"{device}, torch {torch.__version__}, CUDA {torch.version.cuda}, pinning {data['pinning']}, "
                        f"numba {data['numba_threading_layer']}")
    return data


# -- micro: async return, WAW / WAR on one slot, teardown -------------------------------------------
def async_return(check: Check, store: HostExpertStore, slots: torch.Tensor) -> dict:
    """Host time of issuing a non_blocking pinned copy vs the copy's device time."""
    stream = torch.cuda.Stream(device=check.device)
    host, device = [], []
    for _ in range(4):
        check.sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            start.record(stream)
            slots[0].copy_(store.block(0), non_blocking=True)
            end.record(stream)
        host.append(time.perf_counter() - t0)
        end.synchronize()
        device.append(start.elapsed_time(end) / 1e3)
    host_s, copy_s = median(host[1:]), median(device[1:])
    engine = CopyEngine(store, slots, backend="cuda")
    engine_host = []
    for slot in range(slots.shape[0]):
        t0 = time.perf_counter()
        engine.copy(slot, slot)
        engine_host.append(time.perf_counter() - t0)
    engine.close()
    engine_host_s = median(engine_host[1:])
    return {"pinning": store.pinning, "host_ms": host_s * 1e3, "copy_ms": copy_s * 1e3,
            "engine_copy_host_ms": engine_host_s * 1e3, "registered_gbps": store.bytes_per_expert / copy_s / 1e9,
            "ok": host_s < 0.2 * copy_s and engine_host_s < 0.2 * copy_s}


def raw_streams(check: Check, store: HostExpertStore, slot: torch.Tensor, sums: np.ndarray, rounds: int,
                war_wait: bool = True, waw_wait: bool = True) -> dict:
    """Raw torch streams: each round writes two blocks into ONE slot (low-priority stream, then
    high-priority stream), delays the reader with load, reads a checksum; the slot must hold the
    second block. ``war_wait``/``waw_wait`` off are controls that should race."""
    low, high = torch.cuda.Stream.priority_range()
    streams = [torch.cuda.Stream(device=check.device, priority=low),
               torch.cuda.Stream(device=check.device, priority=high)]
    compute = torch.cuda.current_stream(check.device)
    ready, released = torch.cuda.Event(), torch.cuda.Event()
    load = compute_load(check, 8.0)
    rng = np.random.default_rng(1)
    got = torch.zeros(rounds, dtype=torch.int64, device=check.device)
    expected, written, read = [], False, False
    for r in range(rounds):
        first, second = rng.choice(len(sums), size=2, replace=False)
        for key, stream in ((first, streams[0]), (second, streams[1])):
            if read and war_wait:
                stream.wait_event(released)     # write-after-read
            if written and waw_wait:
                stream.wait_event(ready)        # write-after-write
            with torch.cuda.stream(stream):
                slot.copy_(store.block(int(key)), non_blocking=True)
            ready.record(stream)
            written = True
        load()
        compute.wait_event(ready)
        got[r] = checksum(slot)
        released.record(compute)
        read = True
        expected.append(sums[second])
    check.sync()
    bad = int((got.cpu().numpy() != np.array(expected)).sum())
    return {"rounds": rounds, "mismatches": bad}


def engine_rounds(check: Check, store: HostExpertStore, slots: torch.Tensor, sums: np.ndarray, rounds: int,
                  backend: str) -> dict:
    """The CopyEngine on ONE slot under load: demand copies, prefetches (pumped until all chunks
    started), a prefetch cancelled then overwritten by a demand copy, and a prefetch taken over by a
    demand copy of the same key; after each, the reader's checksum must be the expected block's."""
    chunk = 32 * MIB if check.cuda else 8 * 1024
    engine = CopyEngine(store, slots, backend=backend, seed=0, chunk_bytes=chunk, max_prefetch_inflight=2)
    compute_reads = []
    load = compute_load(check, 8.0)
    rng = np.random.default_rng(2)
    got = torch.zeros(rounds, dtype=torch.int64, device=slots.device)
    patterns = ("demand", "prefetch", "cancel-then-demand", "prefetch-then-demand")
    counts = dict.fromkeys(patterns, 0)
    bad = dict.fromkeys(patterns, 0)
    previous = -1
    try:
        for r in range(rounds):
            if not check.has(2):
                break
            pattern = patterns[r % len(patterns)]
            keys = [k for k in range(len(sums)) if k != previous]
            key, other = (int(k) for k in rng.choice(keys, size=2, replace=False))
            if pattern == "demand":
                engine.copy(key, 0)
            elif pattern == "prefetch":
                engine.prefetch(key, 0)
                pump_until_started(check, engine, key)
            elif pattern == "cancel-then-demand":
                engine.prefetch(other, 0)
                engine.pump()
                engine.cancel(other)
                engine.copy(key, 0)
            else:
                engine.prefetch(key, 0)
                engine.pump()
                engine.copy(key, 0)
            load()
            engine.begin_read(0)
            got[r] = checksum(slots[0])
            engine.end_read(0)
            compute_reads.append((r, pattern, key))
            counts[pattern] += 1
            previous = key
        engine.synchronize()
        values = got.cpu().numpy()
        for r, pattern, key in compute_reads:
            bad[pattern] += int(values[r] != sums[key])
    finally:
        engine.close()
    return {"backend": backend, "rounds": counts, "mismatches": bad, "ok": not any(bad.values())}


def pump_until_started(check: Check, engine: CopyEngine, key: int) -> None:
    """Call pump() back to back until every chunk of ``key``'s prefetch is on a stream: the next chunk starts
    as soon as one lands, so the link never waits for the pump (a sleep between pumps would idle it and
    favour large chunks)."""
    while engine.is_queued(key):
        if not check.has(1):
            raise TimeoutError("prefetch chunks did not start before the section's deadline")
        engine.pump()


def teardown(check: Check, store: HostExpertStore, slots: torch.Tensor, backend: str) -> dict:
    """Prefetches queued and in flight, then (a) engine.close(), (b) dropping the engine unclosed,
    (c) unpinning the store under the copies; the device must be error-free after each."""
    chunk = 32 * MIB if check.cuda else 8 * 1024
    result = {}

    def busy_engine() -> CopyEngine:
        engine = CopyEngine(store, slots, backend=backend, seed=3, chunk_bytes=chunk, max_prefetch_inflight=2)
        for k in range(1, slots.shape[0]):
            engine.prefetch(k, k)
        engine.copy(0, 0)
        return engine

    engine = busy_engine()
    engine.close()
    engine.close()
    check.sync()
    result["close_with_prefetches"] = "ok"
    engine = busy_engine()
    del engine
    gc.collect()
    check.sync()
    result["drop_unclosed"] = "ok"
    engine = busy_engine()
    store.close()          # unpins under in-flight copies: must wait for the device first
    store.close()
    engine.close()
    check.sync()
    if check.cuda:
        assert torch.ones(4, device=check.device).add_(1).sum().item() == 8.0
    result["unpin_under_copies"] = "ok"
    result["store_after_close"] = store.pinning
    return result


def micro(check: Check) -> dict:
    blocks = 5
    store, sums = random_store(check, blocks)
    numel = store.shape.numel
    slots = torch.empty((4, numel), dtype=torch.bfloat16, device=check.device)
    data: dict = {"block_mib": store.bytes_per_expert / MIB, "store_pinning": store.pinning}
    backend = "cuda" if check.cuda else "deferred"
    if check.cuda:
        data["async_return"] = async_return(check, store, slots)
        data["raw_streams"] = raw_streams(check, store, slots[0], sums, rounds=16)
        data["raw_controls"] = {
            "no_war_wait": raw_streams(check, store, slots[0], sums, rounds=12, war_wait=False),
            "no_waw_wait": raw_streams(check, store, slots[0], sums, rounds=12, waw_wait=False),
            "note": "races on purpose: mismatches > 0 show the test can see a missing wait",
        }
    else:
        data["async_return"] = data["raw_streams"] = {"skipped": "dry run: needs CUDA"}
    data["engine"] = engine_rounds(check, store, slots, sums, rounds=48 if check.cuda else 24, backend=backend)
    data["teardown"] = teardown(check, store, slots, backend)
    raw_bad = data["raw_streams"].get("mismatches", 0)
    engine_bad = sum(data["engine"]["mismatches"].values())
    async_ok = data["async_return"].get("ok", True)
    data["status"] = "ok" if raw_bad == 0 and engine_bad == 0 and async_ok else "failed"
    async_word = "n/a" if not check.cuda else ("ok" if async_ok else "NOT async")
    data["headline"] = f"engine mismatches {engine_bad}, raw {raw_bad}, async return {async_word}, teardown ok"
    return data


# -- calibrate: this machine's hardware profile -------------------------------------------------
def calibrate(check: Check) -> dict:
    """moe_offload's own measure_profile on one expert of the full-size shape (copy, device compute, the CPU
    runner's kernels, its backend choice for bf16), saved as hardware-<device>.yaml beside the JSON."""
    from moe_offload.cpu_kernels import CpuRunner
    from moe_offload.runtime.calibrate import measure_profile

    shape = check.expert
    store = HostExpertStore(1, 1, shape, torch.bfloat16, pin=check.cuda)
    runner = CpuRunner()
    try:
        block = store.block(0)
        block.copy_(torch.randn(shape.numel, device=check.device, dtype=torch.bfloat16) * 0.02)
        slot = torch.empty(shape.numel, dtype=torch.bfloat16, device=check.device)
        t0 = time.perf_counter()
        runner.warmup(dtypes=["bfloat16"], acts=["silu"])                # Numba compiles here (or loads its cache)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        profile = measure_profile(block, slot, shape, runner, name=f"gpu-check-{check.slug}", repeats=3)
        measure_s = time.perf_counter() - t0
    finally:
        runner.close()
        store.close()
    path = profile.to_yaml(check.out_dir / f"hardware-{check.slug}.yaml")
    check.shared["profile"] = path
    data = {"profile": dataclasses.asdict(profile), "path": str(path), "expert": f"{shape.hidden}x{shape.intermediate} bf16",
            "compile_s": compile_s, "measure_s": measure_s,
            "headline": f"copy {profile.h2d_gbps:.1f} GB/s, device {profile.gpu_mem_gbps:.0f} GB/s / "
                        f"{profile.gpu_tflops:.1f} TFLOP/s, CPU {profile.cpu_mem_gbps:.1f} GB/s / "
                        f"{profile.cpu_gflops:.0f} GFLOP/s"}
    if check.dry:
        data["note"] = "dry run: CPU 'device', tiny expert; the profile means nothing"
    return data


# -- cuda-marked tests -------------------------------------------------------------------------------
def pytest_counts(text: str) -> dict:
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", text):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
    return counts


def tail(text: str | bytes | None, chars: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-chars:]


def cuda_test_files() -> list[str]:
    """The test files that hold CUDA tests (``pytest.mark.cuda``): collecting only these saves the rest's
    imports and fixtures."""
    return sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())


def cuda_tests(check: Check) -> dict:
    check.build.start()   # the full-size checkpoint is written meanwhile (pytest runs in another process)
    targets = cuda_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *targets]
    timeout = max(5.0, check.left() - 2)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = tail(err.stdout) + tail(err.stderr)
        return {"status": "partial", "command": " ".join(cmd), "counts": pytest_counts(out),
                "headline": f"stopped at the cap after {timeout:.0f} s", "tail": out[-3000:]}
    out = proc.stdout + proc.stderr
    summary = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    counts = pytest_counts(summary[-1] if summary else "")
    ok = proc.returncode == 0 and not counts.get("failed") and not counts.get("error")
    data = {"command": " ".join(cmd), "files": targets, "returncode": proc.returncode, "counts": counts,
            "tail": tail(out), "status": "ok" if ok else "failed",
            "headline": ", ".join(f"{n} {w}" for w, n in counts.items()) or f"exit {proc.returncode}"}
    if check.dry:
        data["note"] = "dry run: the CUDA tests skip without a GPU"
    return data


# -- parity ------------------------------------------------------------------------------------------
def prompt_ids(path: Path, device: torch.device) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(path)("def fibonacci(n):\n    if n < 2:", return_tensors="pt").input_ids
    except Exception:  # noqa: BLE001 - a tokenizer-less checkpoint still gets a fixed prompt
        ids = torch.arange(1, 17)[None]
    return ids.to(device)


def greedy(model, ids: torch.Tensor, tokens: int) -> list[int]:
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (got.float() - ref.float()).abs()
    return {"max_abs": diff.max().item(), "rel_max": (diff.max() / ref.float().abs().max()).item(),
            "rel_norm": ((got.float() - ref.float()).norm() / ref.float().norm()).item()}


def parity_case(check: Check, path: Path, dtype: torch.dtype, slots: int, mode: str, ids, ref_logits, ref_tokens,
                tokens: int) -> dict:
    model = moe_offload.from_pretrained(path, device=str(check.device), dtype=dtype, expert_slots=slots,
                                        cpu_experts=mode, hardware=SHIPPED_PROFILE, progress=False)
    try:
        with torch.inference_mode():
            logits = model(ids).logits
            generated = greedy(model, ids, tokens)
        row = compare(logits, ref_logits)
        first_diff = next((i for i, (a, b) in enumerate(zip(generated, ref_tokens)) if a != b), None)
        tol = BF16_TOL if dtype == torch.bfloat16 else FP32_TOL
        row |= {"slots": slots, "cpu_experts": mode, "dtype": str(dtype).removeprefix("torch."),
                "tokens_equal": generated == ref_tokens, "first_token_diff": first_diff, "tolerance": tol,
                "ok": row["rel_norm"] < tol, "hit_rate": model.offload.stats.hit_rate,
                "cpu_experts_run": int(np.sum(getattr(model.offload.stats, "cpu_experts", 0)))}
    finally:
        close_offloaded(model)
        del model
        gc.collect()
    return row


def guarded_case(check: Check, name: str, path: Path, dtype: torch.dtype, slots: int, mode: str, *rest) -> dict:
    """One parity case; an exception becomes a failed row, so the other cases still run."""
    row = {"model": name, "slots": slots, "cpu_experts": mode, "dtype": str(dtype).removeprefix("torch.")}
    try:
        return row | parity_case(check, path, dtype, slots, mode, *rest)
    except Exception as err:  # noqa: BLE001
        return row | {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:],
                      "ok": False, "tokens_equal": False, "rel_norm": float("nan")}


def reference(path: Path, dtype: torch.dtype, device: torch.device, ids, tokens: int):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    with torch.inference_mode():
        logits = ref(ids).logits
        generated = greedy(ref, ids, tokens)
    del ref
    return logits, generated


def parity(check: Check) -> dict:
    from moe_offload.loading.checkpoint import resolve_model_dir
    from moe_offload.loading.config import OffloadConfig
    from moe_offload.loading.parts import ModelParts

    tokens = 4 if check.dry else 16
    models = SHIPPED[:1] if check.dry else SHIPPED
    rows, skipped = [], []
    for name in models:
        path = resolve_model_dir(name)
        total = ModelParts(path, OffloadConfig(device=str(check.device), expert_slots=1)).plan.num_experts
        slot_counts = [1] if check.dry else [1, total // 2, total]
        ids = prompt_ids(path, check.device)
        ref_logits, ref_tokens = reference(path, torch.bfloat16, check.device, ids, tokens)
        for mode in MODES:
            for slots in slot_counts:
                if not check.has(6):
                    skipped.append(f"{name} {mode} slots={slots}")
                    continue
                rows.append(guarded_case(check, name, path, torch.bfloat16, slots, mode, ids, ref_logits, ref_tokens,
                                         tokens))
        del ref_logits
        if check.dry:
            continue       # fp32 adds nothing to the plumbing check
        if check.has(8):   # fp32 once per model: offloading must be exact up to summation order
            ref32, tokens32 = reference(path, torch.float32, check.device, ids, tokens)
            rows.append(guarded_case(check, name, path, torch.float32, max(1, total // 2), "auto", ids, ref32,
                                     tokens32, tokens))
        else:
            skipped.append(f"{name} fp32")
    bad = [r for r in rows if not r["ok"]]
    differ = [r for r in rows if not r["tokens_equal"]]
    worst = max((r["rel_norm"] for r in rows if r["dtype"] == "bfloat16"), default=float("nan"))
    fp32 = max((r["rel_norm"] for r in rows if r["dtype"] == "float32"), default=float("nan"))
    data = {"rows": rows, "tokens": tokens, "status": "failed" if bad else ("partial" if skipped else "ok"),
            "headline": f"{len(rows)} cases, {len(bad)} over tolerance, {len(differ)} greedy diffs; worst bf16 rel "
                        f"{worst:.2e}, fp32 rel {fp32:.1e}"}
    if skipped:
        data["skipped"] = skipped
        data["note"] = "time budget ran out before these cases"
    return data


# -- chunk size: a demand copy's wait behind prefetches ---------------------------------------------
def timed_demand(engine: CopyEngine, key: int, slot: int) -> float:
    t0 = time.perf_counter()
    engine.copy(key, slot)
    engine.demand_stream.synchronize()
    return time.perf_counter() - t0


def demand_wait(check: Check, store: HostExpertStore, slots: torch.Tensor, chunk_bytes: int, backend: str,
                repeats: int) -> dict:
    """Idle: a demand copy alone. Busy: the same copy issued while prefetches of the other slots are
    queued and in flight. Also the prefetch train's throughput when pumped continuously."""
    engine = CopyEngine(store, slots, backend=backend, seed=0, chunk_bytes=chunk_bytes, max_prefetch_inflight=2)
    others = range(1, slots.shape[0])
    idle, busy, train = [], [], []
    try:
        for _ in range(repeats + 1):
            if not check.has(2):
                break
            engine.synchronize()
            idle.append(timed_demand(engine, 0, 0))
            for k in others:
                engine.prefetch(k, k)
            time.sleep(0.001)            # let the first chunks get going
            busy.append(timed_demand(engine, 0, 0))
            for k in others:
                engine.cancel(k)
            engine.synchronize()
            t0 = time.perf_counter()
            for k in others:
                engine.prefetch(k, k)
            for k in others:
                pump_until_started(check, engine, k)
            engine.synchronize()
            train.append(time.perf_counter() - t0)
    finally:
        engine.close()
    if len(idle) < 2:
        raise TimeoutError("no time left for a measurement")
    idle_s, busy_s, train_s = median(idle[1:]), median(busy[1:]), median(train[1:])
    return {"chunk_bytes": chunk_bytes, "idle_ms": idle_s * 1e3, "busy_ms": busy_s * 1e3,
            "wait_ms": (busy_s - idle_s) * 1e3,
            "prefetch_gbps": len(others) * store.bytes_per_expert / train_s / 1e9}


def chunk_size(check: Check) -> dict:
    store, _ = random_store(check, 5)
    slots = torch.empty((5, store.shape.numel), dtype=torch.bfloat16, device=check.device)
    unit = MIB if check.cuda else 1024
    backend = "cuda" if check.cuda else "deferred"
    rows = []
    try:
        for size in CHUNKS:
            if not check.has(3):
                break
            rows.append({"chunk": f"{size} {'MiB' if check.cuda else 'KiB'}"}
                        | demand_wait(check, store, slots, size * unit, backend, repeats=4 if check.cuda else 2))
    finally:
        store.close()
    best = max(r["prefetch_gbps"] for r in rows)
    fast = [r for r in rows if r["prefetch_gbps"] >= 0.9 * best]
    pick = min(fast, key=lambda r: r["wait_ms"])
    data = {"rows": rows, "recommended_chunk_bytes": pick["chunk_bytes"],
            "rule": "least demand wait among chunk sizes within 10% of the best prefetch throughput",
            "headline": f"pick {pick['chunk']}: demand wait {pick['wait_ms']:.2f} ms vs idle {pick['idle_ms']:.2f} ms",
            "status": "ok" if len(rows) == len(CHUNKS) else "partial"}
    if not check.cuda:
        data["note"] = "dry run: deferred CPU backend, chunk sizes in KiB; timings mean nothing"
    return data


# -- full-size shapes --------------------------------------------------------------------------------
def pinned_peak_gbps(check: Check, nbytes: int = 1 << 30) -> float:
    """A plain big pinned (torch's allocator) -> device copy: the link's ceiling."""
    if not check.cuda:
        return float("nan")
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=check.device)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / median(times[1:]) / 1e9


def timed_generate(check: Check, model, ids: torch.Tensor, tokens: int) -> tuple[float, float, float]:
    """Seconds for ``tokens`` greedy tokens, copy seconds and bytes copied during them."""
    copier = model.offload.engine.copier
    copier.copy_seconds()            # clears the record (synchronizes)
    model.offload.reset_stats()
    check.sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        greedy(model, ids, tokens)
    check.sync()
    seconds = time.perf_counter() - t0
    copy_s = copier.copy_seconds() if check.cuda else 0.0
    return seconds, copy_s, float(np.sum(model.offload.stats.bytes_copied))


def decode_profile(check: Check, path, slots: int, ids: torch.Tensor, tokens: int) -> dict:
    """Per decode token: ms, copy ms, bytes; (N tokens - 1 token) / (N - 1) removes the prefill."""
    model = moe_offload.from_pretrained(path, device=str(check.device), dtype=torch.bfloat16, expert_slots=slots,
                                        cpu_experts="never", progress=False)
    try:
        model.offload.engine.copier.timing = True
        timed_generate(check, model, ids, 2)                     # warm up
        one = timed_generate(check, model, ids, 1)
        many = timed_generate(check, model, ids, tokens)
        hit_rate, summary = model.offload.stats.hit_rate, model.offload.stats.summary()
    finally:
        close_offloaded(model)
        del model
        gc.collect()
    per = [(m - o) / (tokens - 1) for m, o in zip(many, one)]
    return {"slots": slots, "ms_per_token": per[0] * 1e3, "copy_ms_per_token": per[1] * 1e3,
            "gb_per_token": per[2] / 1e9, "copy_gbps": per[2] / per[1] / 1e9 if per[1] > 0 else float("nan"),
            "hit_rate": hit_rate, "stats": summary}


def full_prompt(check: Check) -> torch.Tensor:
    """[1, S] the full-size sections' prompt: random ids, the same in every section."""
    ids = torch.randint(1, 1000, (1, 8 if check.dry else 32), generator=torch.Generator().manual_seed(0))
    return ids.to(check.device)


def full_tokens(check: Check) -> int:
    """Tokens the full-size sections generate per timed run."""
    return 4 if check.dry else 16


def num_experts(check: Check, path: Path) -> int:
    """Routed experts of the checkpoint at ``path`` (from its config; nothing is loaded)."""
    from moe_offload.loading.config import OffloadConfig
    from moe_offload.loading.parts import ModelParts

    return ModelParts(path, OffloadConfig(device=str(check.device), expert_slots=1)).plan.num_experts


def full_size(check: Check) -> dict:
    """Copy GB/s = bytes copied / the link's busy time (the union of the copies' CUDA-event intervals: the
    demand and prefetch streams overlap). Hidden share = 1 - (ms per token offloaded - ms per token with
    every expert resident) / copy ms per token. A demand copy's wait behind prefetches is measured in the
    chunk_size section."""
    path, fallback = check.full_checkpoint(reserve_s=30 if check.cuda else 8)
    data: dict = check.build.describe() | {"model": str(path), "pinned_peak_gbps": pinned_peak_gbps(check)}
    notes = [n for n in (fallback, "dry run: tiny-mixtral's widths stand in for the full-size shapes; timings "
                         "mean nothing" if check.dry else None) if n]
    total = num_experts(check, path)
    ids, tokens = full_prompt(check), full_tokens(check)
    data["offloaded"] = decode_profile(check, path, max(1, total // 4), ids, tokens)
    if check.has(5 if check.dry else 15):
        data["resident"] = decode_profile(check, path, total, ids, tokens)
        check.shared["resident_decode_s"] = (path, data["resident"]["ms_per_token"] / 1e3)
        exposed = data["offloaded"]["ms_per_token"] - data["resident"]["ms_per_token"]
        copy_ms = data["offloaded"]["copy_ms_per_token"]
        data["exposed_copy_ms_per_token"] = exposed
        data["hidden_copy_share"] = min(1.0, max(0.0, 1 - exposed / copy_ms)) if copy_ms > 0 else float("nan")
    else:
        data["status"] = "partial"
        notes.append("stopped at the cap: no all-resident run, so no hidden share")
    if fallback:
        data["status"] = "partial"
    off = data["offloaded"]
    data["copy_efficiency"] = off["copy_gbps"] / data["pinned_peak_gbps"] if check.cuda else float("nan")
    data["headline"] = (f"{off['ms_per_token']:.1f} ms/token at {off['slots']}/{total} slots, hit {off['hit_rate']:.0%}, "
                        f"copy {off['copy_gbps']:.1f}/{data['pinned_peak_gbps']:.1f} GB/s, hidden "
                        f"{data.get('hidden_copy_share', float('nan')):.0%}")
    if notes:
        data["note"] = "; ".join(notes)
    return data


# -- time per decode step, and the routing of a run -------------------------------------------------
class StepClock(StoppingCriteria):
    """A stopping criterion that never stops: when each generated token is done (synchronized), so the
    intervals between calls are the decode steps."""

    def __init__(self, check: Check):
        self.check = check
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.check.sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_steps(check: Check, model, ids: torch.Tensor, tokens: int) -> list[float]:
    """Seconds of each decode step of one greedy generation of ``tokens`` tokens (``tokens`` - 1 steps: the
    first token comes from the prefill)."""
    clock = StepClock(check)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([clock]))
    return np.diff(clock.times).tolist()


class DeferredTraceRecorder(TraceRecorder):
    """The runtime's TraceRecorder, fed after the run: during it each router call is only cloned on the
    device, so recording adds no host synchronization to a timed generation."""

    def __init__(self, num_layers: int):
        super().__init__(num_layers, gate_inputs=True, scores_dtype=torch.float32)   # the scores the policy saw
        self._pending: list[tuple | None] = []                                        # router calls; None: next prompt

    def __call__(self, layer: int, gate_input: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        self._pending.append((layer, gate_input.detach().clone(), probs.detach().clone(), chosen.detach().clone()))

    def next_sequence(self) -> None:
        self._pending.append(None)

    def trace(self, meta: dict):
        for call in self._pending:
            if call is None:
                super().next_sequence()
            else:
                super().__call__(*call)
        self._pending = []
        return super().trace(meta)


# -- host waits: spin or block on the readback events ----------------------------------------------
def host_wait_row(check: Check, label: str, path: Path, rounds: int, tokens: int) -> dict:
    """ms per decode step with every miss on the CPU experts, the host spinning on its readback events vs
    blocking on them, in alternating order on one loaded model (Engine.set_host_wait)."""
    from moe_offload.transfer.readback import HOST_WAITS

    slots = max(1, num_experts(check, path) // 4)
    model = moe_offload.from_pretrained(path, device=str(check.device), dtype=torch.bfloat16, expert_slots=slots,
                                        cpu_experts="always", predictor="none", progress=False)
    steps: dict[str, list[float]] = {mode: [] for mode in HOST_WAITS}
    ids = full_prompt(check)
    try:
        decode_steps(check, model, ids, 2)                              # warm up
        for r in range(rounds):
            for mode in HOST_WAITS if r % 2 == 0 else HOST_WAITS[::-1]:
                if not check.has(3 if check.cuda else 1):
                    break
                model.offload.engine.set_host_wait(mode)
                steps[mode] += decode_steps(check, model, ids, tokens)
        cpu_runs = int(np.sum(model.offload.stats.cpu_experts))
    finally:
        close_offloaded(model)
        del model
        gc.collect()
    if not all(steps.values()):
        raise TimeoutError(f"{label}: stopped at the cap before both host waits were timed")
    ms = {mode: median(v) * 1e3 for mode, v in steps.items()}
    faster = min(ms, key=ms.get)
    return {"model": label, "slots": slots, "steps": {m: len(v) for m, v in steps.items()}, "cpu_expert_runs": cpu_runs,
            "ms_per_step": ms, "faster": faster, "block_over_spin": ms["block"] / ms["spin"],
            "quartiles_ms": {m: np.percentile(np.array(v) * 1e3, [25, 75]).tolist() for m, v in steps.items()}}


def host_wait(check: Check) -> dict:
    from moe_offload.loading.checkpoint import resolve_model_dir

    path, fallback = check.full_checkpoint(reserve_s=20 if check.cuda else 8)
    models = [("full-size" if fallback is None else "tiny-mixtral", path)]
    if fallback is None:
        models.append(("tiny-mixtral", resolve_model_dir("tiny-mixtral")))
    rounds, tokens = (4, 8) if check.cuda else (2, 3)
    rows, skipped = [], []
    for label, model_path in models:
        if rows and not check.has(10 if check.cuda else 3):
            skipped.append(label)
            continue
        rows.append(host_wait_row(check, label, model_path, rounds, tokens))
    first = rows[0]
    data = {"rows": rows, "recommended_host_wait": first["faster"], "decided_on": first["model"],
            "rule": "the faster median ms per decode step on the largest model run (rounds alternate the order)",
            "headline": "; ".join(f"{r['model']}: spin {r['ms_per_step']['spin']:.2f} vs block "
                                  f"{r['ms_per_step']['block']:.2f} ms/step" for r in rows)
                        + f" -> {first['faster']}",
            "status": "partial" if skipped or fallback else "ok"}
    notes = [n for n in (fallback, skipped and f"stopped at the cap before {', '.join(skipped)}",
                         "dry run: no CUDA events, both waits are the same code; timings mean nothing"
                         if not check.cuda else None) if n]
    if notes:
        data["note"] = "; ".join(notes)
    return data


# -- the planner: measured vs projected -----------------------------------------------------------
def planner_run(check: Check, path: Path, profile: Path | str, slots: int) -> dict:
    """The offloaded model as the runtime runs it beside a GPU (score cache, cross-layer prefetch at depth 1,
    hybrid scheduler with ``profile``'s costs): a warm-up generation, then a timed one, both recorded."""
    from moe_offload.loading.router_params import router_params

    model = moe_offload.from_pretrained(path, device=str(check.device), dtype=torch.bfloat16, expert_slots=slots,
                                        cpu_experts="auto", hardware=str(profile), predictor="cross_layer",
                                        prefetch_depth=1, progress=False)
    off = model.offload
    recorder = DeferredTraceRecorder(len(off.moe_layers))
    ids, tokens = full_prompt(check), full_tokens(check)
    try:
        off.router_tap.add(recorder)
        decode_steps(check, model, ids, 2)                             # warm up (replayed too: same cache history)
        recorder.next_sequence()
        off.reset_stats()
        steps = decode_steps(check, model, ids, tokens)
        recorder.next_sequence()
        off.router_tap.remove(recorder)
        stats = off.stats
        run = {"steps": steps, "hits": int(stats.hits.sum()), "misses": int(stats.misses.sum()),
               "cpu_experts": int(stats.cpu_experts.sum()), "prefetch_used": int(stats.prefetch_used.sum()),
               "policy": off.config.cache_policy, "policy_params": off.config.policy_params, "slots": off.plan.slots,
               "bytes_per_expert": off.store.bytes_per_expert, "cost": off.engine.protocol.costs,
               "router": router_params(model).to("cpu"), "width": off.engine.prefetcher.width}
    finally:
        close_offloaded(model)
        del model
        gc.collect()
    run["trace"] = recorder.trace({"model": str(path)})
    return run


def simulate(run: dict, trace, slots: int):
    """``trace`` replayed by the simulator with the real run's settings and cost model."""
    from moe_offload.predictor import make_predictor
    from moe_offload.simulate import RoutingArrays, Simulator

    simulator = Simulator(RoutingArrays.of(trace), run["cost"], run["bytes_per_expert"], "auto",
                          predictor=lambda: make_predictor("cross_layer", run["router"]), prefetch_depth=1,
                          prefetch_width=run["width"])
    return simulator.run(run["policy"], slots, **run["policy_params"])


def projected_decode(run: dict, slots: int) -> tuple[float, float]:
    """(projected seconds per decode step of the timed generation, projected hit rate of that generation):
    the whole trace replayed minus its replay without the timed decode steps (and without the timed
    generation, for the hit rate), so both start from the cache the real run had."""
    trace, decode_rows = run["trace"], len(run["steps"])
    before_decode = np.ones(trace.num_tokens, dtype=bool)
    before_decode[trace.num_tokens - decode_rows:] = False
    whole = simulate(run, trace, slots)
    prefix = simulate(run, trace.select(before_decode), slots)
    warmup = simulate(run, trace.select(trace.sequence == trace.sequence[0]), slots)
    hits, misses = whole.hits - warmup.hits, whole.misses - warmup.misses
    return (whole.seconds - prefix.seconds) / decode_rows, hits / max(1, hits + misses)


def planner(check: Check) -> dict:
    """Measured vs projected decode tokens/s; planner_error = projected / measured - 1 (above 0: the planner
    is optimistic). The simulator projects the routed experts' time only; the rest
    (attention, norms, lm_head, the host's work) is estimated as the all-resident run's measured time minus
    its projection (from full_size), added to give the dense-inclusive projection."""
    path, fallback = check.full_checkpoint(reserve_s=25 if check.cuda else 8)
    profile = check.shared.get("profile")
    notes = [n for n in (fallback, None if profile else f"no calibrated profile: costs from {SHIPPED_PROFILE}")
             if n]
    total = num_experts(check, path)
    run = planner_run(check, path, profile or SHIPPED_PROFILE, max(1, total // 4))
    measured_s = float(np.mean(run["steps"]))
    projected_s, projected_hit = projected_decode(run, run["slots"])
    data = {"model": str(path), "profile": str(profile or SHIPPED_PROFILE), "slots": run["slots"],
            "experts": total, "decode_steps": len(run["steps"]),
            "settings": "score cache, cross_layer prefetch depth 1, cpu_experts auto",
            "measured_tokens_per_s": 1 / measured_s, "projected_tokens_per_s": 1 / projected_s,
            "planner_error": measured_s / projected_s - 1,
            "measured_hit_rate": run["hits"] / max(1, run["hits"] + run["misses"]),
            "projected_hit_rate": projected_hit, "measured_cpu_experts": run["cpu_experts"],
            "measured_prefetch_used": run["prefetch_used"]}
    resident = check.shared.get("resident_decode_s")
    if resident and resident[0] == path and check.has(2):
        resident_projected, _ = projected_decode(run, total)
        dense_s = max(0.0, resident[1] - resident_projected)
        data |= {"dense_s_per_token": dense_s, "projected_with_dense_tokens_per_s": 1 / (projected_s + dense_s),
                 "planner_error_with_dense": measured_s / (projected_s + dense_s) - 1}
    else:
        notes.append("no all-resident measurement of this checkpoint: no dense-inclusive projection")
    with_dense = data.get("projected_with_dense_tokens_per_s")
    data["headline"] = (f"measured {data['measured_tokens_per_s']:.1f} tok/s, projected {data['projected_tokens_per_s']:.1f} "
                        f"(experts only)" + (f", {with_dense:.1f} with dense" if with_dense else "")
                        + f"; hit {data['measured_hit_rate']:.0%} vs {projected_hit:.0%}")
    if fallback or not profile:
        data["status"] = "partial"
    if check.dry:
        notes.append("dry run: CPU device, small shapes; the numbers mean nothing")
    if notes:
        data["note"] = "; ".join(notes)
    return data


# -- host synchronizations ------------------------------------------------------------------------
def host_syncs(check: Check) -> dict:
    """Synchronizing CUDA calls per MoE layer call in decode (torch.cuda.set_sync_debug_mode('warn')
    turns each into a warning), with prefetch and the hybrid scheduler on; and the engine's own count
    of packed readbacks per layer call (the target: one, plus one when CPU experts run)."""
    from moe_offload.loading.checkpoint import resolve_model_dir

    path = resolve_model_dir("tiny-mixtral")
    model = moe_offload.from_pretrained(path, device=str(check.device), dtype=torch.bfloat16, expert_slots=12,
                                        cpu_experts="auto", predictor="cross_layer", prefetch_depth=2,
                                        hardware=SHIPPED_PROFILE, progress=False)
    ids = prompt_ids(path, check.device)
    try:
        with torch.inference_mode():
            greedy(model, ids, 2)                          # warm up
            model.offload.reset_stats()
            engine = model.offload.engine
            reads0, cpu0 = engine.protocol.readback.reads, engine._cpu_inputs.reads
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if check.cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    greedy(model, ids, 8)
                finally:
                    if check.cuda:
                        torch.cuda.set_sync_debug_mode("default")
            calls = int(np.sum(model.offload.stats.layer_calls))
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            sites = {}
            for w in syncs:
                site = f"{Path(w.filename).name}:{w.lineno}"
                sites[site] = sites.get(site, 0) + 1
    finally:
        close_offloaded(model)
        del model
    data = {"moe_layer_calls": calls, "readbacks_per_layer": (engine.protocol.readback.reads - reads0) / max(calls, 1),
            "cpu_input_readbacks_per_layer": (engine._cpu_inputs.reads - cpu0) / max(calls, 1),
            "sync_warnings": len(syncs), "sync_warnings_per_layer": len(syncs) / max(calls, 1),
            "sync_sites": dict(sorted(sites.items(), key=lambda kv: -kv[1])[:15])}
    data["headline"] = (f"{data['sync_warnings_per_layer']:.2f} synchronizing calls per MoE layer call "
                        f"(whole forward, 9 tokens), {data['readbacks_per_layer']:.2f} packed readbacks")
    return data


# -- end to end --------------------------------------------------------------------------------------
E2E_LINE = re.compile(r"^\s+(\S+) @ (\d+)%: ([\d.]+) prefill tok/s, ([\d.]+) decode tok/s", re.MULTILINE)


def e2e_settings(check: Check, model: Path, full: bool) -> list[str]:
    """bench/e2e_gpu.py's arguments: the model's own routing (no synthetic trace to build), one budget, a
    short prompt; three of our designs on the full-size checkpoint, every design on tiny-mixtral."""
    common = ["--model", str(model), "--device", str(check.device), "--native-routing", "--repeats", "1"]
    if check.dry:
        return common + ["--budgets", "0.5", "--prompt-tokens", "8", "--new-tokens", "2",
                         "--designs", "lru-demand,full"]
    designs = "lru-demand,full,cpu-moe" if full else "accelerate,lru-demand,cpu-moe,static-hot,full"
    return common + ["--budgets", "0.25", "--prompt-tokens", "32", "--new-tokens", "8", "--designs", designs]


def e2e(check: Check) -> dict:
    path, fallback = check.full_checkpoint(reserve_s=30 if check.cuda else 15)
    out = check.scratch / "e2e.json"
    cmd = [sys.executable, str(BENCH / "e2e_gpu.py"), *e2e_settings(check, path, fallback is None), "--no-plot",
           "--out", str(out)]
    data: dict = {"command": " ".join(cmd)}
    if fallback:
        data["note"] = fallback
    timeout = max(5.0, check.left() - 2)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        printed = tail(err.stdout, 20000)
        rows = [{"design": d, "budget_fraction": int(b) / 100, "prefill_tokens_per_s": float(p),
                 "decode_tokens_per_s": float(t)} for d, b, p, t in E2E_LINE.findall(printed)]
        return data | {"status": "partial", "rows": rows, "tail": tail(printed) + tail(err.stderr, 1500),
                       "headline": f"stopped at the cap after {timeout:.0f} s with {len(rows)} designs measured"}
    data |= {"returncode": proc.returncode, "tail": tail(proc.stdout, 2000) + tail(proc.stderr, 1500)}
    if proc.returncode != 0 or not out.is_file():
        return data | {"status": "failed", "headline": f"exit {proc.returncode}"}
    result = json.loads(out.read_text())
    rows = result.get("results", [])
    data |= {"rows": rows, "notes": result.get("notes", []), "routing": result.get("routing"),
             "headline": ", ".join(f"{r['design']} {r['decode_tokens_per_s']:.1f}" for r in rows) + " decode tok/s",
             "status": "partial" if fallback else "ok"}
    return data


SECTIONS = (
    Section("environment", environment, cap_s=15, min_s=5),
    Section("micro", micro, cap_s=25, min_s=15, quiet=True),
    Section("calibrate", calibrate, cap_s=25, min_s=10, quiet=True),
    Section("cuda_tests", cuda_tests, cap_s=70, min_s=20),
    Section("parity", parity, cap_s=45, min_s=20),
    Section("host_syncs", host_syncs, cap_s=15, min_s=8, quiet=True),
    Section("chunk_size", chunk_size, cap_s=20, min_s=10, quiet=True),
    Section("full_size", full_size, cap_s=50, min_s=25, quiet=True),
    Section("host_wait", host_wait, cap_s=30, min_s=12, quiet=True),
    Section("planner", planner, cap_s=35, min_s=15, quiet=True),
    Section("e2e", e2e, cap_s=45, min_s=20),
)
MARGIN_S = 30.0   # the caps' sum stays this far below the default budget (start-up, teardown, a slow section)


def out_paths(args: argparse.Namespace, slug: str) -> tuple[Path, Path]:
    """(output folder, JSON path): --out, else bench/results (a dry run: a new temporary folder, so a smoke
    run writes nothing under bench/results)."""
    if args.out:
        folder = Path(args.out)
    elif args.dry_run:
        folder = Path(tempfile.mkdtemp(prefix="gpu-check-out-"))
    else:
        folder = RESULTS
    return folder, folder / f"gpu-check-{slug}.json"


def print_report(report: dict) -> None:
    """The table (section, status, seconds against the cap, headline) and the sums."""
    sections = report["sections"]
    rows = [{"section": name, "status": s["status"], "seconds": s.get("seconds", 0.0), "cap": s.get("cap_s", 0.0),
             "headline": s.get("headline") or s.get("note") or s.get("error", "")} for name, s in sections.items()]
    print_table(rows, [("section", "section", ""), ("status", "status", ""), ("seconds", "s", ".1f"),
                       ("cap", "cap s", ".0f"), ("headline", "headline", "")])
    spent = sum(r["seconds"] for r in rows)
    print(f"sections {spent:.0f} s of {report['caps_sum_s']:.0f} s capped; run {report['elapsed_s']:.0f} s of the "
          f"{report['budget_s']:.0f} s budget")


def main(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device visible: run with --dry-run (or --device cpu) to check the plumbing on the CPU")
        return 2
    args.dry_run = args.dry_run or args.device == "cpu"
    slug = "cpu-dry-run" if args.dry_run else device_name(args.device)
    out_dir, out = out_paths(args, slug)
    check = Check(args, out_dir)
    wanted = set(args.sections.split(",")) if args.sections else {s.name for s in SECTIONS}
    caps = {s.name: s.cap_s for s in SECTIONS}
    report = {"device": slug, "device_name": torch.cuda.get_device_name(check.device) if check.cuda else "cpu",
              "dry_run": check.dry, "budget_s": args.budget_s, "caps_s": caps, "caps_sum_s": sum(caps.values()),
              "command": " ".join(sys.argv), "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "sections": {}}
    print(f"{report['device_name']}: {len(SECTIONS)} sections capped at {report['caps_sum_s']:.0f} s of a "
          f"{args.budget_s:.0f} s budget; writing {out}", flush=True)
    watchdog = start_watchdog(check, report, out)
    try:
        for section in SECTIONS:
            if section.name not in wanted:
                report["sections"][section.name] = {"status": "skipped", "seconds": 0.0, "cap_s": section.cap_s,
                                                    "note": "not selected"}
                continue
            report["current"] = section.name
            print(f"[{time.monotonic() - check.t0:6.1f} s] {section.name} (cap {section.cap_s:.0f} s) ...", flush=True)
            report["sections"][section.name] = run_section(check, section)
            report["elapsed_s"] = round(time.monotonic() - check.t0, 1)
            write_json(out, json.loads(json.dumps(report, default=str)))
    finally:
        watchdog.cancel()
        faulthandler.cancel_dump_traceback_later()
        report.pop("current", None)
        check.build.stop.set()
        check.build.wait(30)
        report["checkpoint_build"] = check.build.describe()
        if not args.keep_scratch and not args.scratch:
            shutil.rmtree(check.scratch, ignore_errors=True)
    report["elapsed_s"] = round(time.monotonic() - check.t0, 1)
    write_json(out, json.loads(json.dumps(report, default=str)))
    print_report(report)
    print(f"wrote {out}")
    return 0 if all(s["status"] in ("ok", "skipped", "partial") for s in report["sections"].values()) else 1


def parse_args(argv=None) -> argparse.Namespace:
    caps = ", ".join(f"{s.name} {s.cap_s:.0f}" for s in SECTIONS)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"caps in seconds: {caps}; {sum(s.cap_s for s in SECTIONS):.0f} in all")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N; cpu means --dry-run")
    p.add_argument("--dry-run", "--smoke", dest="dry_run", action="store_true",
                   help="every section on the CPU with small shapes (--smoke: the same)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"seconds for all sections (default {BUDGET_S:.0f}); a section past it is skipped")
    p.add_argument("--grace-s", type=float, default=20.0, help="after budget + grace a watchdog writes and exits")
    p.add_argument("--sections", help=f"comma list of sections to run (default all: {','.join(s.name for s in SECTIONS)})")
    p.add_argument("--checkpoint", help=f"an existing {FULL_LAYERS}-layer {FULL_PRESET}-shaped checkpoint "
                                        "(bench/full_size.py) to use instead of writing one")
    p.add_argument("--scratch", help="folder for the full-size checkpoint (default a temporary one, removed)")
    p.add_argument("--keep-scratch", action="store_true", help="keep the temporary folder")
    p.add_argument("--out", help="folder for gpu-check-<device>.json and the calibrated hardware profile "
                                 "(default bench/results; a dry run: a temporary folder)")
    args = p.parse_args(argv)
    if args.checkpoint and not (Path(args.checkpoint) / "config.json").is_file():
        p.error(f"--checkpoint {args.checkpoint}: no config.json there; give a checkpoint folder")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
