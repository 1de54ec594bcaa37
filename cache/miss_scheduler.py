"""Where a router call's experts run, and how long the call takes: the simulator's scheduling seam.

A scheduler gets, for one router call, each selected expert's token count
and whether it is resident, and a cost model (anything with ``copy_s()``,
``gpu_s(tokens)``, ``cpu_s(tokens)``, or None). It answers a MissPlan: the
experts that run on the device, in the order the engine runs them (resident
ones first, then copied misses), the ones that run on the CPU (never
copied, never cached), and the call's projected seconds. ``CopyEveryMiss``
copies every miss; moe_offload's hybrid scheduler plugs in through the same
``plan`` (see moe_offload.sweep.EngineScheduler).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class ExpertCost(Protocol):
    def copy_s(self) -> float: ...
    def gpu_s(self, tokens: int) -> float: ...
    def cpu_s(self, tokens: int) -> float: ...


@dataclass(frozen=True)
class MissPlan:
    device: tuple[int, ...]   # indices into the call's experts run on the device: resident first, then copies
    cpu: tuple[int, ...]      # indices run on the CPU (not copied, not cached)
    seconds: float            # projected time of the call's routed experts


class MissScheduler(Protocol):
    """``fills_free_slots`` (optional attribute, default False): experts placed on the CPU also take
    free slots (a background copy, no eviction), as the engine's 'auto' mode does."""

    def plan(self, tokens: Sequence[int], resident: Sequence[bool], cost: ExpertCost | None) -> MissPlan: ...


class CopyEveryMiss:
    """Copy every miss. Time, as the engine overlaps it: copies start at once, back to back
    on the copy stream, while the resident experts run; a copied expert runs once its copy
    has landed and the device is free (larger token counts first):

        t = sum gpu_s(hits);  for miss i: t = max(t, (i + 1) * copy_s) + gpu_s(tokens_i)

    This never exceeds "gpu_s for hits + (copy_s + gpu_s) per miss". Without a cost model
    the time is 0.
    """

    def plan(self, tokens: Sequence[int], resident: Sequence[bool], cost: ExpertCost | None) -> MissPlan:
        hits = [i for i, r in enumerate(resident) if r]
        misses = [i for i, r in enumerate(resident) if not r]
        return MissPlan(tuple(hits + misses), (), self.seconds([tokens[i] for i in hits],
                                                                [tokens[i] for i in misses], cost))

    @staticmethod
    def seconds(hit_tokens: Sequence[int], miss_tokens: Sequence[int], cost: ExpertCost | None) -> float:
        if cost is None:
            return 0.0
        t = sum(cost.gpu_s(n) for n in hit_tokens)
        copied = 0.0
        for n in sorted(miss_tokens, reverse=True):
            copied += cost.copy_s()
            t = max(t, copied) + cost.gpu_s(n)
        return t
