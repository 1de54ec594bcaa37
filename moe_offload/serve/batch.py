"""PaddedBatch: the running sequences' KV cache as one left-padded batch.

B = running sequences, L = cache length (the longest sequence), Hkv = KV heads, D = head dim.
Every layer's keys and values are [B, Hkv, L, D]; a shorter sequence is padded on the left and
its ``mask`` row [L] is 0 there, so one decode step feeds [B, 1] tokens with a [B, L + 1]
attention mask and per-row position ids. A new sequence is prefilled alone in its own
``DynamicCache`` and merged in; a finished one is dropped by selecting the remaining rows, and
columns that are padding in every remaining row are cut, so its KV memory goes with it.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def _pad_left(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` [B, Hkv, l, D] (or a mask [B, l]) zero-padded on the left of its time axis to ``length``."""
    missing = length - x.shape[-2 if x.dim() == 4 else -1]
    if missing == 0:
        return x
    if x.dim() == 4:
        pad = x.new_zeros(x.shape[0], x.shape[1], missing, x.shape[3])
        return torch.cat([pad, x], dim=2)
    return torch.cat([x.new_zeros(x.shape[0], missing), x], dim=1)


def cache_argument(model) -> str:
    """The name ``model.forward`` takes its KV cache by: ``cache`` (transformers >= 5.24, which warns on
    the old name) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PaddedBatch:
    """The KV cache, attention mask and last tokens of the running sequences, one row each."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L] long, 1 = a real token
        self.last_tokens: torch.Tensor | None = None  # [B] the token each row feeds next

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, cache: DynamicCache, next_token: int) -> None:
        """Append one prefilled sequence (``cache`` of batch 1, length P) as the last row."""
        length_new = cache.get_seq_length()
        mask_new = torch.ones(1, length_new, dtype=torch.long)
        token = torch.tensor([next_token])
        if self.cache is None:
            self.cache, self.mask, self.last_tokens = cache, mask_new, token
            return
        length = max(self.length, length_new)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)])
            mine.values = torch.cat([_pad_left(mine.values, length), _pad_left(theirs.values, length)])
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(mask_new, length)])
        self.last_tokens = torch.cat([self.last_tokens, token])

    def step_inputs(self) -> dict:
        """The model inputs of one decode step: each row's last token at its next position."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)  # [B, L + 1]
        positions = self.mask.sum(dim=1, keepdim=True) - 1  # [B, 1] real tokens before this one
        return {"input_ids": self.last_tokens[:, None], "attention_mask": self.mask, "position_ids": positions}

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); cut the columns that are now padding everywhere."""
        if not rows:
            self.cache = self.mask = self.last_tokens = None
            return
        if rows == list(range(self.size)):
            return
        index = torch.tensor(rows)
        self.mask, self.last_tokens = self.mask[index], self.last_tokens[index]
        start = int((self.mask.sum(dim=0) > 0).nonzero()[0])  # first column some row uses
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            # Indexing with a tensor copies, so the dropped rows' memory is released now.
            rows_here = index.to(layer.keys.device)
            layer.keys = layer.keys[rows_here, :, start:]
            layer.values = layer.values[rows_here, :, start:]
