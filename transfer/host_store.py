"""HostExpertStore: every routed expert in host memory, one contiguous block per expert."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..cpu_kernels.packed import ExpertFormat
from .pinning import PinnedBuffer

# L = MoE layers, E = experts per layer, H = hidden size, I = expert intermediate size
# A block is [gate_up (2I*H) | down (H*I)] flattened: gate_up rows 0..I-1 are the
# gate projection, rows I..2I-1 the up projection (transformers' fused layout).


PARTS = ("gate", "up", "down")      # the projections of an expert, tracked one by one
_ROLE_PARTS = {"gate": ("gate",), "up": ("up",), "gate_up": ("gate", "up"), "down": ("down",)}


@dataclass(frozen=True)
class ExpertShape:
    """Sizes of one routed expert."""

    hidden: int
    intermediate: int

    @property
    def numel(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def gate_up_numel(self) -> int:
        return 2 * self.intermediate * self.hidden


class HostExpertStore:
    """All routed experts of a model as one [L*E, row] host tensor, allocated once.

    Expert ``(layer, expert)`` (layer = MoE-layer ordinal) is row ``layer * E + expert``: 3*H*I
    elements of ``dtype``, or with a packed ``fmt`` (cpu_kernels.packed.ExpertFormat) its bytes,
    scales included. The store is page-locked when ``pin`` is set, so device copies can be
    asynchronous.
    """

    def __init__(self, num_layers: int, num_experts: int, shape: ExpertShape, dtype: torch.dtype, pin: bool,
                 fmt: ExpertFormat | None = None, capacity: int | None = None):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.shape = shape
        self.format = fmt or ExpertFormat(str(dtype).removeprefix("torch."), shape.hidden, shape.intermediate, dtype)
        self.dtype = self.format.row_dtype
        # A host cache of ``capacity`` rows (the disk tier fills them): ``slot_of[key]`` is the row holding
        # expert ``key`` (-1: on disk only). Without a capacity every expert has its own row, key = row.
        self.capacity = capacity
        self.slot_of = None if capacity is None else np.full(num_layers * num_experts, -1, dtype=np.int64)
        rows = (capacity or num_layers * num_experts, self.format.row_numel)
        self._memory: PinnedBuffer | None = None
        if pin:
            self._memory = PinnedBuffer(rows, self.dtype)    # warns and falls back if it cannot page-lock
            self.blocks = self._memory.tensor                 # [L*E, row]
        else:
            self.blocks = torch.empty(rows, dtype=self.dtype)  # [L*E, row]
        # How the store is page-locked: "registered" (cudaHostRegister, exact size), "torch"
        # (torch's pinned allocator) or "none"; copies may be asynchronous only while pinned.
        self.pinning = self._memory.pinning if self._memory is not None else "none"
        self.pinned = self.pinning != "none"
        self.filled = torch.zeros(num_layers * num_experts, len(PARTS), dtype=torch.bool)  # [L*E, gate|up|down]

    def copied_by(self, device: torch.device) -> None:
        """Copies from the store run on ``device``'s streams: unpinning waits for that device, not only the
        current one."""
        if self._memory is not None:
            self._memory.copied_by(device)

    def close(self) -> None:
        """Unpin now (idempotent). The blocks stay readable, but only for synchronous copies.

        Call after every copy from the store has been waited for (it also synchronizes
        the device before unregistering, as a guard).
        """
        if self._memory is not None:
            self._memory.unpin()
        self.pinned = False
        self.pinning = "none"

    def release(self) -> None:
        """Unpin and free the blocks now (idempotent): the store holds no experts afterwards."""
        self.close()
        self.blocks = self.blocks.new_empty((0, self.format.row_numel))
        self._memory = None

    @property
    def num_keys(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def bytes_per_expert(self) -> int:
        return self.format.nbytes

    @property
    def nbytes(self) -> int:
        return self.blocks.shape[0] * self.bytes_per_expert

    def key(self, layer: int, expert: int) -> int:
        return layer * self.num_experts + expert

    def block(self, key: int) -> torch.Tensor:
        """The contiguous row of expert ``key`` ([3*H*I] of ``dtype``, or its packed bytes)."""
        if self.slot_of is None:
            return self.blocks[key]
        row = int(self.slot_of[key])
        if row < 0:
            raise KeyError(f"expert {key} is not in the host cache (on disk only)")
        return self.blocks[row]

    def write(self, key: int, role: str, tensor: torch.Tensor) -> None:
        """Store one projection ('gate' [I, H], 'up' [I, H], 'gate_up' [2I, H], 'down' [H, I]) of expert
        ``key``: cast, or quantized into the packed format."""
        self._check(key, role, tensor)
        self.format.write(self.blocks[key], role, tensor)
        self.filled[key, [PARTS.index(p) for p in _ROLE_PARTS[role]]] = True

    def write_fp8(self, key: int, role: str, q: torch.Tensor, scale_inv: torch.Tensor) -> None:
        """Store one projection given as float8_e4m3fn ``q`` with 128x128 block scales, bytes as they are
        (an fp8 store only)."""
        self._check(key, role, q)
        self.format.write_fp8(self.blocks[key], role, q, scale_inv)
        self.filled[key, [PARTS.index(p) for p in _ROLE_PARTS[role]]] = True

    def write_int4(self, key: int, role: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store one projection given as int4 codes (uint8 [R, K/2], two per byte) with float16 scale and
        zero [R, ceil(K/G)] in the store's groups, as they are (an int4 store only)."""
        self._check(key, role, torch.empty(q.shape[0], 2 * q.shape[1], device="meta"))   # the weights' [R, K]
        self.format.write_int4(self.blocks[key], role, q, scale, zero)
        self.filled[key, [PARTS.index(p) for p in _ROLE_PARTS[role]]] = True

    def _check(self, key: int, role: str, tensor: torch.Tensor) -> None:
        h, i = self.shape.hidden, self.shape.intermediate
        expected = {"gate": (i, h), "up": (i, h), "gate_up": (2 * i, h), "down": (h, i)}[role]
        if tuple(tensor.shape) != expected:
            raise ValueError(f"expert {key} {role}: shape {tuple(tensor.shape)}, expected {expected}")

    def missing_keys(self) -> list[int]:
        """Keys of experts with at least one projection (gate, up or down) never written."""
        return (~self.filled.all(dim=1)).nonzero().flatten().tolist()

    def missing_parts(self, key: int) -> list[str]:
        """The projections of expert ``key`` never written, in PARTS order."""
        return [part for part, done in zip(PARTS, self.filled[key].tolist()) if not done]
