"""HostExpertStore: every routed expert in host memory, one contiguous block per expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pinning import pinned_empty

# L = MoE layers, E = experts per layer, H = hidden size, I = expert intermediate size
# A block is [gate_up (2I*H) | down (H*I)] flattened: gate_up rows 0..I-1 are the
# gate projection, rows I..2I-1 the up projection (transformers' fused layout).


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


def gate_up_view(block: torch.Tensor, shape: ExpertShape) -> torch.Tensor:
    """[2I, H] view of a block."""
    return block[: shape.gate_up_numel].view(2 * shape.intermediate, shape.hidden)


def down_view(block: torch.Tensor, shape: ExpertShape) -> torch.Tensor:
    """[H, I] view of a block."""
    return block[shape.gate_up_numel :].view(shape.hidden, shape.intermediate)


class HostExpertStore:
    """All routed experts of a model as one [L*E, 3*H*I] host tensor, allocated once.

    Expert ``(layer, expert)`` (layer = MoE-layer ordinal) is row ``layer * E + expert``.
    The store is page-locked when ``pin`` is set, so device copies can be asynchronous.
    """

    def __init__(self, num_layers: int, num_experts: int, shape: ExpertShape, dtype: torch.dtype, pin: bool):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.shape = shape
        self.dtype = dtype
        self.pinned = pin
        self.pinning = "none"   # how the store is page-locked: "registered" (cudaHostRegister), "torch" or "none"
        rows = (num_layers * num_experts, shape.numel)
        if pin:
            self.blocks, self.pinning = pinned_empty(rows, dtype)   # [L*E, 3HI]
        else:
            self.blocks = torch.empty(rows, dtype=dtype)            # [L*E, 3HI]
        self.filled = torch.zeros(num_layers * num_experts, dtype=torch.bool)

    @property
    def num_keys(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def bytes_per_expert(self) -> int:
        return self.shape.numel * self.blocks.element_size()

    @property
    def nbytes(self) -> int:
        return self.num_keys * self.bytes_per_expert

    def key(self, layer: int, expert: int) -> int:
        return layer * self.num_experts + expert

    def block(self, key: int) -> torch.Tensor:
        """[3*H*I] contiguous block of expert ``key``."""
        return self.blocks[key]

    def write(self, key: int, role: str, tensor: torch.Tensor) -> None:
        """Copy one projection ('gate' [I, H], 'up' [I, H], 'down' [H, I]) into its block."""
        block, i = self.blocks[key], self.shape.intermediate
        views = {
            "gate": gate_up_view(block, self.shape)[:i],
            "up": gate_up_view(block, self.shape)[i:],
            "gate_up": gate_up_view(block, self.shape),
            "down": down_view(block, self.shape),
        }
        target = views[role]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"expert {key} {role}: shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)
        if role in ("down", "gate_up"):
            self.filled[key] = True

    def missing_keys(self) -> list[int]:
        return (~self.filled).nonzero().flatten().tolist()
