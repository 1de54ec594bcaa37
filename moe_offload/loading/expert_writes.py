"""Writing one routed-expert tensor from the checkpoint into a host store row (cast, quantized, or fp8 / int4 as
stored)."""

from __future__ import annotations

import torch

from ..cpu_kernels.packed import FP8_BLOCK
from ..errors import MoEOffloadError
from .int4_checkpoint import Int4Checkpoint, StoredInt4
from ..transfer import HostExpertStore
from .parts import ModelParts


def _write(store: HostExpertStore, key: int, role: str, tensor, name: str) -> None:
    try:
        if isinstance(tensor, torch.Tensor):
            store.write(key, role, tensor)
        elif isinstance(tensor, StoredInt4):
            store.write_int4(key, role, tensor.q, tensor.scale, tensor.zero)
        else:   # an FP8Weight kept as stored
            store.write_fp8(key, role, tensor.q, tensor.scale_inv)
    except ValueError as err:
        raise MoEOffloadError(f"tensor {name}: {err}; the weights and config.json do not belong together") from None


def fp8_as_stored(parts: ModelParts, store: HostExpertStore) -> bool:
    """Whether the checkpoint's fp8 expert weights go into the store byte for byte (same 128x128 blocks)."""
    quantization = parts.checkpoint.quantization
    return store.format.name == "fp8" and quantization is not None and \
        tuple(quantization.block) == (FP8_BLOCK, FP8_BLOCK)


def int4_as_stored(parts: ModelParts, store: HostExpertStore) -> bool:
    """Whether the checkpoint's int4 expert weights go into the store repacked, not re-quantized (the store's
    groups split the checkpoint's)."""
    quantization = parts.checkpoint.quantization
    return isinstance(quantization, Int4Checkpoint) and store.format.group > 0 and \
        quantization.fits(store.format.group)


def write_expert(parts: ModelParts, store: HostExpertStore, key: int, role: str, name: str, index: tuple,
                 device: torch.device | None) -> None:
    """One expert tensor (``index``: the expert's row of a fused tensor) into the store."""
    checkpoint = parts.checkpoint
    aligned = role != "gate_up" or store.format.inter % FP8_BLOCK == 0   # fused gate_up blocks must not straddle
    if fp8_as_stored(parts, store) and name in checkpoint.scales and aligned:
        weight = checkpoint.fp8_weight_slice(name, index[0]) if index else checkpoint.fp8_weight(name)
        _write(store, key, role, weight, name)
        return
    if name in checkpoint.int4 and not index and int4_as_stored(parts, store):
        try:
            stored = checkpoint.int4_weight(name).regrouped(store.format.group)
        except ValueError as err:
            raise MoEOffloadError(f"tensor {name}: {err}; the int4 experts cannot be kept without re-quantizing "
                                  "them: pass expert_dtype (--expert-dtype) bfloat16 to keep them dequantized") \
                from None
        _write(store, key, role, stored, name)
        return
    tensor = checkpoint.get_slice(name, index[0]) if index else checkpoint.get(name)
    if store.format.packed and device is not None and device.type != "cpu":
        tensor = tensor.to(device)
    _write(store, key, role, tensor, name)
