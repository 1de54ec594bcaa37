"""MemoryPlan: how a device memory budget splits into dense weights, KV reserve and expert slots."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoEOffloadError
from .config import OffloadConfig


def format_bytes(n: int | float) -> str:
    """1536 -> '1.50 KiB'; picks the unit that keeps the number readable."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


_gib = format_bytes


@dataclass(frozen=True)
class MemoryPlan:
    dense_bytes: int
    bytes_per_expert: int
    num_moe_layers: int
    experts_per_layer: int
    kv_reserve_bytes: int
    workspace_bytes: int
    budget_bytes: int | None
    slots: int
    host_rows: int | None = None      # host expert cache rows (host_memory); None: every expert in host memory

    @property
    def num_experts(self) -> int:
        return self.num_moe_layers * self.experts_per_layer

    @property
    def expert_bytes(self) -> int:
        return self.num_experts * self.bytes_per_expert

    @property
    def slot_bytes(self) -> int:
        return self.slots * self.bytes_per_expert

    @property
    def disk_tier(self) -> bool:
        """Experts beyond host memory live on disk (three tiers)."""
        return self.host_rows is not None and self.host_rows < self.num_experts

    @property
    def host_bytes(self) -> int:
        return (self.num_experts if self.host_rows is None else self.host_rows) * self.bytes_per_expert

    @property
    def one_per_layer(self) -> bool:
        return self.slots >= self.num_moe_layers

    @property
    def fixed_bytes(self) -> int:
        return self.dense_bytes + self.kv_reserve_bytes + self.workspace_bytes

    def describe(self) -> dict:
        return {
            "dense_bytes": self.dense_bytes,
            "expert_bytes": self.expert_bytes,
            "bytes_per_expert": self.bytes_per_expert,
            "num_experts": self.num_experts,
            "moe_layers": self.num_moe_layers,
            "experts_per_layer": self.experts_per_layer,
            "kv_reserve_bytes": self.kv_reserve_bytes,
            "workspace_bytes": self.workspace_bytes,
            "budget_bytes": self.budget_bytes,
            "slots": self.slots,
            "slot_fraction": self.slots / self.num_experts,
            "one_expert_per_layer": self.one_per_layer,
            "host_rows": self.num_experts if self.host_rows is None else self.host_rows,
            "host_bytes": self.host_bytes,
            "disk_bytes": self.expert_bytes if self.disk_tier else 0,
        }


def plan_memory(cfg: OffloadConfig, dense_bytes: int, bytes_per_expert: int, num_moe_layers: int,
                experts_per_layer: int, kv_bytes_per_token: int) -> MemoryPlan:
    """Slots from ``expert_slots`` or from what ``gpu_memory`` leaves after the fixed parts."""
    total = num_moe_layers * experts_per_layer
    kv = kv_bytes_per_token * cfg.kv_reserve_tokens
    fixed = dense_bytes + kv + cfg.workspace_bytes
    if cfg.expert_slots is not None:
        slots = min(int(cfg.expert_slots), total)
    elif cfg.gpu_memory is not None:
        if cfg.gpu_memory < fixed:
            raise MoEOffloadError(
                f"gpu_memory {_gib(cfg.gpu_memory)} is smaller than the dense weights ({_gib(dense_bytes)}) "
                f"+ KV reserve ({_gib(kv)}, {cfg.kv_reserve_tokens} tokens) + workspace ({_gib(cfg.workspace_bytes)}); "
                f"give at least {_gib(fixed + bytes_per_expert)} or lower kv_reserve_tokens"
            )
        slots = min((cfg.gpu_memory - fixed) // bytes_per_expert, total)
        if slots < 1:
            raise MoEOffloadError(
                f"gpu_memory {_gib(cfg.gpu_memory)} leaves {_gib(cfg.gpu_memory - fixed)} for experts, "
                f"less than one expert ({_gib(bytes_per_expert)}); give at least {_gib(fixed + bytes_per_expert)}"
            )
    else:
        slots = total
    return MemoryPlan(dense_bytes, bytes_per_expert, num_moe_layers, experts_per_layer, kv,
                      cfg.workspace_bytes, cfg.gpu_memory, int(slots), host_rows(cfg, bytes_per_expert, total,
                                                                                    experts_per_layer))


def host_rows(cfg: OffloadConfig, bytes_per_expert: int, total: int, experts_per_layer: int) -> int | None:
    """Rows of the host expert cache ``host_memory`` buys (None: every expert in host memory); at least one MoE
    layer's experts, since one call may run all of them."""
    if cfg.host_memory is None:
        return None
    rows = cfg.host_memory // bytes_per_expert
    if rows < experts_per_layer:
        need = experts_per_layer * bytes_per_expert
        raise MoEOffloadError(
            f"host_memory {_gib(cfg.host_memory)} holds {rows} experts, fewer than one MoE layer's "
            f"{experts_per_layer} ({_gib(need)}): one call may run all of them; give at least {_gib(need)}"
        )
    return int(min(rows, total))
