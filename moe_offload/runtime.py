"""OffloadRuntime: what a loaded model exposes as ``model.offload``."""

from __future__ import annotations

from .budget import MemoryPlan
from .config import OffloadConfig
from .engine import Engine
from .router_tap import RouterTap
from .stats import OffloadStats
from .transfer import HostExpertStore


class OffloadRuntime:
    """Config, memory plan, host store and engine of one offloaded model."""

    def __init__(self, config: OffloadConfig, plan: MemoryPlan, store: HostExpertStore, engine: Engine,
                 moe_layers: list[int], router_tap: RouterTap):
        self.config = config
        self.plan = plan
        self.store = store
        self.engine = engine
        self.moe_layers = moe_layers  # model layer index of each MoE-layer ordinal
        self.router_tap = router_tap

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
        for layer, expert in experts:
            key = self.store.key(layer, expert)
            if engine.cache.lookup(key) >= 0:
                continue
            got = engine.cache.acquire(key)
            if got is None:
                break
            engine.copier.copy(key, got[0])
            loaded += 1
        engine.copier.synchronize()
        return loaded

    def __repr__(self) -> str:
        return (f"OffloadRuntime(device={self.config.device}, slots={self.plan.slots}/{self.plan.num_experts}, "
                f"policy={self.config.cache_policy}, {self.stats.summary()})")
