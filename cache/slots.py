"""ExpertSlots: the fixed pool of device expert buffers and the expert <-> slot maps."""

from __future__ import annotations

import numpy as np
import torch


class ExpertSlots:
    """``num_slots`` device buffers of ``block_numel`` elements, allocated once.

    ``expert_to_slot[key]`` is the slot holding expert ``key`` or -1;
    ``slot_to_expert[slot]`` the expert in a slot or -1 (free).
    """

    def __init__(self, num_slots: int, num_keys: int, block_numel: int, dtype: torch.dtype, device: torch.device):
        if num_slots < 1:
            raise ValueError("need at least one slot")
        self.buffers = torch.empty((num_slots, block_numel), dtype=dtype, device=device)  # [S, 3HI]
        self.expert_to_slot = np.full(num_keys, -1, dtype=np.int64)
        self.slot_to_expert = np.full(num_slots, -1, dtype=np.int64)
        self.slot_of: list[int] = [-1] * num_keys     # expert_to_slot as a list: lookups are on every hot path
        self._free = list(range(num_slots - 1, -1, -1))
        self.frees = 0      # free() calls so far: caches keeping their own residency lists resync on change

    @classmethod
    def bookkeeping(cls, num_slots: int, num_keys: int) -> "ExpertSlots":
        """Slot maps without device buffers (zero-size blocks), for the simulator."""
        return cls(num_slots, num_keys, 0, torch.float32, torch.device("cpu"))

    @property
    def num_slots(self) -> int:
        return self.buffers.shape[0]

    @property
    def nbytes(self) -> int:
        return self.buffers.numel() * self.buffers.element_size()

    def lookup(self, key: int) -> int:
        return self.slot_of[key]

    def has_free(self) -> bool:
        return bool(self._free)

    def take_free(self) -> int:
        if not self._free:
            raise RuntimeError("no free expert slot; a slot was lost from the free list")
        return self._free.pop()

    def assign(self, key: int, slot: int) -> None:
        old = self.slot_to_expert[slot]
        if old >= 0:
            self.expert_to_slot[old] = self.slot_of[old] = -1
        self.slot_to_expert[slot] = key
        self.expert_to_slot[key] = self.slot_of[key] = int(slot)

    def evict(self, key: int) -> int:
        """Forget ``key``; its slot stays taken until reassigned. Returns the slot."""
        slot = self.slot_of[key]
        if slot < 0:
            raise KeyError(f"expert {key} holds no slot")
        self.expert_to_slot[key] = self.slot_of[key] = -1
        self.slot_to_expert[slot] = -1
        return slot

    def resident(self) -> list[int]:
        return [int(k) for k in self.slot_to_expert if k >= 0]

    def free(self, key: int) -> int:
        """Forget ``key`` and return its slot to the free list. Returns the slot."""
        slot = self.evict(key)
        assert slot >= 0 and slot not in self._free, slot
        self._free.append(slot)
        self.frees += 1
        return slot
