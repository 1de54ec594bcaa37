"""Where each routed expert's bytes lie on disk, as positional-read runs into its host row.

Two sources, by what the host row holds:

- the checkpoint's own shards, when the row is the checkpoint's bytes unchanged (a native format in
  the checkpoint's dtype): per expert, its gate, up and down tensors (or its slices of fused
  [E, 2I, H] / [E, H, I] tensors) land at their offsets in the row;
- otherwise (a packed format, a cast, fp8 dequantized on read) the quantize-once cache file, one
  contiguous run per expert, built expert by expert on the first load so the experts never have to fit
  in host memory at once.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..errors import MoEOffloadError
from ..transfer import HostExpertStore
from ..transfer.disk import Run
from . import quant_cache
from .expert_writes import write_expert
from .parts import ModelParts

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def expert_tensors(parts: ModelParts) -> dict[int, list[tuple[str, str, int | None]]]:
    """key -> [(tensor name, role, expert index in a fused tensor or None)] for every routed expert."""
    ordinal = {s.model_layer: i for i, s in enumerate(parts.sites)}
    out: dict[int, list] = defaultdict(list)
    for name in parts.checkpoint.tensors:
        t = parts.adapter.expert_tensor(name)
        if t is None or t.layer not in ordinal:
            continue
        base = ordinal[t.layer] * parts.num_experts
        if t.expert is not None:
            out[base + t.expert].append((name, t.role, None))
            continue
        role = "gate_up" if t.role == "gate_up" else "down"
        for e in range(parts.num_experts):
            out[base + e].append((name, role, e))
    return out


def checkpoint_runs(parts: ModelParts, fmt) -> dict[int, list[Run]] | None:
    """Runs into native rows straight from the shards; None when the rows are not the stored bytes."""
    checkpoint = parts.checkpoint
    if fmt.name == "gguf":
        return gguf_runs(parts, fmt)
    if fmt.packed or parts.is_gguf or not checkpoint.reads_as_stored:
        return None
    item = torch.empty((), dtype=fmt.row_dtype).element_size()
    h, i = fmt.hidden, fmt.inter
    where = {"gate": 0, "up": i * h * item, "gate_up": 0, "down": 2 * i * h * item}
    runs: dict[int, list[Run]] = {}
    for key, tensors in expert_tensors(parts).items():
        runs[key] = []
        for name, role, index in tensors:
            info = checkpoint.tensors[name]
            if _SAFETENSORS_DTYPES.get(info.dtype) != fmt.row_dtype:
                return None
            size = info.nbytes // (info.shape[0] if index is not None else 1)
            offset = info.offset + (index or 0) * size
            runs[key].append(Run(str(info.shard), offset, where[role], size))
    return runs


def gguf_runs(parts: ModelParts, fmt) -> dict[int, list[Run]]:
    """Runs into GGUF-format rows: each expert's gate, up and down bytes, one contiguous run each in the file."""
    runs: dict[int, list[Run]] = {}
    for ordinal, site in enumerate(parts.sites):
        where = fmt.offsets(ordinal)
        for e in range(parts.num_experts):
            row = runs[ordinal * parts.num_experts + e] = []
            for proj in ("gate", "up", "down"):
                path, offset, nbytes = parts.checkpoint.expert_run(site.model_layer, proj, e)
                row.append(Run(path, offset, where[proj], nbytes))
    return runs


def cache_runs(parts: ModelParts, store_format, folder, progress: bool) -> dict[int, list[Run]]:
    """Runs from the quantize-once cache file, built now (expert by expert, with a progress bar) when none
    matches the checkpoint."""
    shards = sorted({info.shard for info in parts.checkpoint.tensors.values()})
    num_keys = len(parts.sites) * parts.num_experts
    key = quant_cache.cache_key(shards, store_format, num_keys)
    path = quant_cache.cache_path(folder, key, store_format.name)
    offsets = quant_cache.cached_offsets(path, key, num_keys, store_format.nbytes)
    if offsets is None:
        tensors = expert_tensors(parts)
        one = HostExpertStore(1, 1, parts.shape, parts.dtype, pin=False, fmt=store_format)

        def fill(k: int, row: torch.Tensor) -> None:
            one.blocks[0].zero_()
            for name, role, index in tensors[k]:
                write_expert(parts, one, 0, role, name, () if index is None else (index,), None)
            row.copy_(one.blocks[0])

        quant_cache.write_rows(path, key, store_format, num_keys, fill, progress)
        offsets = quant_cache.cached_offsets(path, key, num_keys, store_format.nbytes)
        if offsets is None:
            raise MoEOffloadError(f"the quantized-experts cache {path} could not be written; set quant_cache to a "
                                  "writable folder with room for the packed experts")
    return {k: [Run(str(path), offset, 0, store_format.nbytes)] for k, offset in enumerate(offsets)}


def expert_runs(parts: ModelParts, store_format, folder, progress: bool) -> tuple[dict[int, list[Run]], str]:
    """(runs per key, 'checkpoint' or 'cache file'): where the disk tier reads each expert."""
    runs = checkpoint_runs(parts, store_format)
    if runs is not None:
        return runs, "checkpoint"
    return cache_runs(parts, store_format, folder, progress), "cache file"
