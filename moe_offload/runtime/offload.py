"""OffloadRuntime: what a loaded model exposes as ``model.offload``."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..transfer import HostExpertStore
from .engine import Engine
from .residency import DEMAND
from .router_tap import RouterTap
from .stats import OffloadStats

if TYPE_CHECKING:   # the loader builds the runtime from these; the runtime never imports the loader
    from ..loading.budget import MemoryPlan
    from ..loading.config import OffloadConfig


class OffloadRuntime:
    """Config, memory plan, host store and engine of one offloaded model.

    ``lock`` serializes forwards: the engine's per-layer state (cache, copies in
    flight, prefetches aimed at coming layers) belongs to one forward at a time,
    so callers on several threads each get their exact answer. ``close()`` (or
    ``with model.offload:``) waits for copies, removes the hooks, stops the CPU
    runner and unpins the host store.
    """

    def __init__(self, config: OffloadConfig, plan: MemoryPlan, store: HostExpertStore, engine: Engine,
                 moe_layers: list[int], router_tap: RouterTap):
        self.config = config
        self.plan = plan
        self.store = store
        self.engine = engine
        self.moe_layers = moe_layers  # model layer index of each MoE-layer ordinal
        self.router_tap = router_tap
        self.lock = threading.RLock()
        self.closed = False
        self._guard: _ForwardGuard | None = None

    @property
    def stats(self) -> OffloadStats:
        return self.engine.stats

    def reset_stats(self) -> None:
        self.engine.stats.reset()

    def preload(self, experts: list[tuple[int, int]]) -> int:
        """Copy ``(moe_layer, expert)`` pairs into free or evictable slots now; returns how many landed.

        With ``cpu_experts="always"`` nothing evicts them later: the static hot-expert
        placement that kTransformers uses.
        """
        engine, loaded = self.engine, 0
        with self.lock:
            for layer, expert in experts:
                key = self.store.key(layer, expert)
                if engine.cache.lookup(key) >= 0:
                    continue
                if engine.residency.copy_in(key, DEMAND) is None:
                    break
                loaded += 1
            engine.copier.synchronize()
        return loaded

    def guard_forward(self, model) -> None:
        """Hold ``lock`` for each forward of ``model`` (hooks; released even when the forward raises)."""
        guard = _ForwardGuard(self.lock)
        self._guard = guard
        for module in {id(m): m for m in (model, model.base_model)}.values():   # the inner model too: RLock
            module.register_forward_pre_hook(guard.enter)
            module.register_forward_hook(guard.exit, always_call=True)

    def close(self) -> None:
        """Wait for copies, remove the router hooks, stop the CPU runner, unpin host memory. Idempotent;
        the model cannot run afterwards."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            engine = self.engine
            engine.copier.close()
            if engine.residency.host is not None:
                engine.residency.host.close()
            self.router_tap.close()
            if engine.cpu_runner is not None:
                engine.cpu_runner.close()
            engine.close()
            self.store.release()
            if self._guard is not None:
                self._guard.closed = True   # its hooks stay: a later forward gets a clear error

    def __enter__(self) -> "OffloadRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"OffloadRuntime(device={self.config.device}, slots={self.plan.slots}/{self.plan.num_experts}, "
                f"policy={self.config.cache_policy}, {self.stats.summary()})")


class _ForwardGuard:
    """Forward hooks that hold a lock for the length of one forward; refuse a closed model."""

    def __init__(self, lock: threading.RLock):
        self.lock = lock
        self.closed = False

    def enter(self, module, args) -> None:
        self.lock.acquire()     # released by ``exit``, which torch calls even when this raises
        if self.closed:
            raise RuntimeError("this offloaded model was closed (model.offload.close()); load it again")

    def exit(self, module, args, output) -> None:
        self.lock.release()
