"""Module-based batching: each decoder layer's attention in micro-batches over a host-resident KV cache,
each MoE layer once over every token of the step.

B = sequences in the step, T = tokens fed per sequence, L = cached columns, b = sequences per micro-batch.
The engine's forward feeds the whole batch [B, T], so every MoE layer (and the experts it copies) runs
once per step for all B sequences. ``MicroBatchedAttention`` wraps one layer's transformers attention
module: it runs that module on b sequences at a time, each micro-batch's cached keys and values brought
from the cache's storage (host memory, page-locked on CUDA) to the device for the call, and the T new
columns of all micro-batches appended to the storage afterwards. The cache object is the batch's own
``DynamicCache``: its layers hold the host tensors, and ``PaddedBatch`` moves, merges and trims rows of
them as before. On the CPU the "device" is host memory and the path is the same, so CI checks its math.

transformers' own offloaded cache (``DynamicCache(offloading=True)``) moves whole layers between the
device and the CPU around each layer's update and prefetches the next on a side stream: it saves device
memory for one sequence, but each layer's whole batch still attends at once. Here the batch dimension is
split, which bounds the device memory of attention (the KV of b sequences, and their scores) whatever B.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionSplit:
    """Sequences per attention micro-batch, and where the KV cache lives between steps."""

    rows: int
    storage: torch.device  # host memory ("cpu")
    pinned: bool  # page-locked host memory (CUDA: asynchronous copies)

    @classmethod
    def for_model(cls, model, rows: int) -> AttentionSplit:
        return cls(max(1, rows), torch.device("cpu"), model.device.type == "cuda")


def _rows_of(value, rows: slice, batch: int):
    """``value`` cut to the micro-batch's ``rows`` when it is per sequence (a tensor [B, ...] with at least two
    dimensions, or a tuple of them); as it is otherwise (1-D positions, broadcast masks, flags)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_rows_of(v, rows, batch) for v in value)
    return value


class _RowsView:
    """What one micro-batch's attention sees as its cache: the stored keys and values of its rows on the
    device, the new ones appended; the new ones are kept for the storage."""

    def __init__(self, layer, rows: slice, device: torch.device) -> None:
        self.layer, self.rows, self.device = layer, rows, device
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys``/``values`` [b, Hkv, T, D] of this step -> the micro-batch's [b, Hkv, L + T, D]."""
        self.new = keys, values
        layer = self.layer
        if not layer.is_initialized or layer.keys.numel() == 0:
            return keys, values
        # From page-locked memory the copies are asynchronous on the current stream, which the attention
        # kernels that read them follow.
        past_keys = layer.keys[self.rows].to(self.device, non_blocking=True)  # [b, Hkv, L, D]
        past_values = layer.values[self.rows].to(self.device, non_blocking=True)
        return torch.cat([past_keys, keys], dim=-2), torch.cat([past_values, values], dim=-2)


class MicroBatchedAttention(nn.Module):
    """One decoder layer's attention run ``split.rows`` sequences at a time over host-resident KV."""

    def __init__(self, attention: nn.Module, split: AttentionSplit) -> None:
        super().__init__()
        self.attention = attention
        self.split = split
        self.layer_idx = attention.layer_idx

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        name = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(name)
        if cache is None:
            return self.attention(hidden_states=hidden_states, **kwargs)
        while len(cache.layers) <= self.layer_idx:  # a DynamicCache made without a config adds layers lazily
            cache.layers.append(cache.layer_class_to_replicate())
        layer = cache.layers[self.layer_idx]
        batch = hidden_states.shape[0]  # hidden_states [B, T, H]
        outputs, views = [], []
        for start in range(0, batch, self.split.rows):
            rows = slice(start, min(batch, start + self.split.rows))
            view = _RowsView(layer, rows, hidden_states.device)
            inputs = {k: _rows_of(v, rows, batch) for k, v in kwargs.items()} | {name: view}
            outputs.append(self.attention(hidden_states=hidden_states[rows], **inputs)[0])  # [b, T, H]
            views.append(view)
        self._store(layer, torch.cat([v.new[0] for v in views]), torch.cat([v.new[1] for v in views]))
        return torch.cat(outputs), None

    def _store(self, layer, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append this step's ``keys``/``values`` [B, Hkv, T, D] to the layer's host storage."""
        keys, values = self._host(keys), self._host(values)
        if not layer.is_initialized:
            layer.lazy_initialization(keys, values)
        if layer.keys.numel() == 0:
            layer.keys, layer.values = keys, values
        else:
            layer.keys = self._host(torch.cat([layer.keys, keys], dim=-2))
            layer.values = self._host(torch.cat([layer.values, values], dim=-2))

    def _host(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.split.storage)
        return x.pin_memory() if self.split.pinned and not x.is_pinned() else x


def attention_modules(model) -> list[tuple[nn.Module, str]]:
    """(decoder layer, attribute) of every layer's attention module."""
    return [(layer, "self_attn") for layer in model.model.layers]


@contextlib.contextmanager
def micro_batched_attention(model, split: AttentionSplit) -> Iterator[None]:
    """Every decoder layer's attention micro-batched as ``split`` says while the block runs; the model's
    own modules are put back afterwards."""
    swapped = []
    try:
        for layer, attr in attention_modules(model):
            original = getattr(layer, attr)
            setattr(layer, attr, MicroBatchedAttention(original, split))
            swapped.append((layer, attr, original))
        yield
    finally:
        for layer, attr, original in swapped:
            setattr(layer, attr, original)
