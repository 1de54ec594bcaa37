"""Run a grid of simulations ("cells") on a local process pool or on Ray, with the same results as one by one.

A sweep or a plan is a grid of independent replays of one trace: (policy, slots, allocation, predictor,
prefetch depth, host rows, CPU-expert mode). ``run_cells`` runs them where asked: inline, on a process pool
over the machine's cores (the default), or as Ray tasks (``ray_address``: '' for a local Ray, else a
cluster's address). Each cell is a pure function of the shared replay inputs and its own parameters, so
every executor gives the same SimulationResult, cell for cell, in the order given.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..errors import MoEOffloadError
from ..predictor.registry import NO_PREDICTOR
from .calls import RoutingArrays
from .simulator import SimulationResult, Simulator


@dataclass(frozen=True)
class Replay:
    """What every cell of a grid shares: the trace, its costs and how a predictor is made."""

    trace: object                       # a predictor Trace (the oracle reads it; RoutingArrays.of converts it)
    cost: object                        # a CostModel
    bytes_per_expert: int
    router_params: object = None        # RouterParams on the CPU, for predictors that read the router weights
    model_dir: str | None = None        # for predictors fitted on the model's files


@dataclass(frozen=True)
class Cell:
    """One replay of a grid."""

    policy: str
    slots: int
    allocation: str = "global"
    predictor: str = NO_PREDICTOR
    prefetch_depth: int = 1
    host_rows: int | None = None        # host cache rows (the disk tier), or None: every expert in host memory
    cpu_experts: str = "auto"


def run_cell(replay: Replay, cell: Cell) -> SimulationResult:
    """Replay ``replay.trace`` for one cell (what each executor runs)."""
    from ..predictor import make_predictor

    maker = None
    if cell.predictor != NO_PREDICTOR:
        def maker():
            return make_predictor(cell.predictor, replay.router_params, fit_trace=replay.trace,
                                  replay_trace=replay.trace, model_dir=replay.model_dir)
    simulator = Simulator(RoutingArrays.of(replay.trace), replay.cost, replay.bytes_per_expert, cell.cpu_experts,
                          predictor=maker, prefetch_depth=cell.prefetch_depth, host_rows=cell.host_rows)
    return simulator.run(cell.policy, cell.slots, cell.allocation)


def run_cells(replay: Replay, cells: list[Cell], workers: int | None = None, ray_address: str | None = None,
              progress: bool = True, desc: str = "simulate") -> list[SimulationResult]:
    """Every cell's result, in order. ``ray_address`` None: a process pool of ``workers`` processes (default:
    the machine's cores; 1 or a single cell: inline); '' a local Ray; else the Ray cluster at that address."""
    return run_jobs([(replay, cell) for cell in cells], workers, ray_address, progress, desc)


def run_jobs(jobs: list[tuple[Replay, Cell]], workers: int | None = None, ray_address: str | None = None,
             progress: bool = True, desc: str = "simulate") -> list[SimulationResult]:
    """``run_cells`` for cells of several replays (e.g. one per expert format): (replay, cell) pairs."""
    if ray_address is not None:
        return _on_ray(jobs, ray_address, progress, desc)
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    bar = tqdm(total=len(jobs), desc=desc, unit="cell", disable=not progress)
    if workers <= 1:
        results = []
        for replay, cell in jobs:
            results.append(run_cell(replay, cell))
            bar.update()
        bar.close()
        return results
    with ProcessPoolExecutor(workers, mp_context=_context(), initializer=_one_thread) as pool:
        futures = [pool.submit(run_cell, replay, cell) for replay, cell in jobs]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        results = [future.result() for future in futures]
    bar.close()
    return results


def _context():
    """Fork where the platform has it (the workers inherit the imported modules: no second start-up)."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)   # the pool already uses every core


def _on_ray(jobs: list[tuple[Replay, Cell]], address: str, progress: bool, desc: str) -> list[SimulationResult]:
    try:
        import ray
    except ImportError:
        raise MoEOffloadError("--ray needs Ray: pip install 'moe-offload[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(run_cell)
        shared = {}
        for replay, _ in jobs:                      # each replay goes to the object store once
            shared.setdefault(id(replay), ray.put(replay))
        refs = [remote.remote(shared[id(replay)], cell) for replay, cell in jobs]
        bar = tqdm(total=len(refs), desc=f"{desc} (ray)", unit="cell", disable=not progress)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
        bar.close()
        return ray.get(refs)
    finally:
        if started:
            ray.shutdown()
