"""PaddedBatch: sequences' KV caches as one left-padded batch.

B = sequences, L = cache length (columns), Hkv = KV heads, D = head dim, W = tokens fed per row in one forward.
Every layer's keys and values are [B, Hkv, L, D]; the ``mask`` [B, L] is 1 where a column holds one of the
row's tokens and 0 where it is padding. One forward feeds every row W new tokens, right-aligned and
left-padded to the longest (``feed``): a decode step is W = 1, a prefill chunk W = the chunk. A row's
padding can therefore sit between its own tokens (a short chunk beside a long one); the mask hides it
from attention and the position ids count only real tokens, so each row sees exactly its own sequence.
Rows move between batches (``take``, ``merge``): a prompt is prefilled in one batch and joins the
decoding batch when its last chunk is in. A finished row is dropped by selecting the remaining rows, and
columns that are padding in every remaining row are cut, so its KV memory goes with it.
"""

from __future__ import annotations

import copy
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


def _filled(cache: DynamicCache | None) -> bool:
    """The cache holds tensors (a new ``DynamicCache`` has none until its first forward)."""
    return cache is not None and cache.get_seq_length() > 0


class PaddedBatch:
    """The KV cache, attention mask and last tokens of a set of sequences, one row each."""

    def __init__(self, rows: int = 0) -> None:
        """A batch of ``rows`` sequences with no tokens yet (0: no sequences)."""
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = torch.zeros(rows, 0, dtype=torch.long) if rows else None  # [B, L]
        self.last_tokens: torch.Tensor | None = torch.zeros(rows, dtype=torch.long) if rows else None  # [B]

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def cache_for(self, config) -> DynamicCache:
        """The batch's cache, a new ``DynamicCache`` for ``config`` when it has none yet."""
        if self.cache is None:
            self.cache = DynamicCache(config=config)
        return self.cache

    def add(self, cache: DynamicCache, next_token: int) -> None:
        """Append one prefilled sequence (``cache`` of batch 1, length P) as the last row."""
        one = PaddedBatch()
        one.cache, one.mask = cache, torch.ones(1, cache.get_seq_length(), dtype=torch.long)
        one.last_tokens = torch.tensor([next_token])
        self.merge(one)

    def merge(self, other: PaddedBatch) -> None:
        """Append ``other``'s rows after this batch's (both left-padded to the longer length)."""
        if other.size == 0:
            return
        if self.size == 0:
            self.cache, self.mask, self.last_tokens = other.cache, other.mask, other.last_tokens
            return
        length = max(self.length, other.length)
        source = self.cache if _filled(self.cache) else other.cache if _filled(other.cache) else None
        if source is not None:  # the first filled cache takes every row
            for i, layer in enumerate(source.layers):
                (k1, v1), (k2, v2) = self._layer_rows(i, layer, length), other._layer_rows(i, layer, length)
                layer.keys, layer.values = torch.cat([k1, k2]), torch.cat([v1, v2])
            self.cache = source
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(other.mask, length)])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])

    def _layer_rows(self, index: int, like, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's keys and values [B, Hkv, length, D] of layer ``index``, zeros shaped as ``like``'s
        when the batch has no tokens yet."""
        if _filled(self.cache):
            layer = self.cache.layers[index]
            return _pad_left(layer.keys, length), _pad_left(layer.values, length)
        keys, values = like.keys, like.values
        return (keys.new_zeros(self.size, keys.shape[1], length, keys.shape[3]),
                values.new_zeros(self.size, values.shape[1], length, values.shape[3]))

    def feed(self, chunks: list[list[int]]) -> dict:
        """The model inputs of one forward that feeds row r the tokens ``chunks[r]`` (non-empty), each chunk
        right-aligned and left-padded to the longest; the mask grows by that width."""
        width = max(len(c) for c in chunks)
        ids = torch.zeros(self.size, width, dtype=torch.long)  # [B, W]
        real = torch.zeros(self.size, width, dtype=torch.long)  # [B, W] 1 = a token of the row
        for row, chunk in enumerate(chunks):
            ids[row, width - len(chunk):] = torch.tensor(chunk)
            real[row, width - len(chunk):] = 1
        return self._append(ids, real)

    def step_inputs(self) -> dict:
        """The model inputs of one decode step: each row's last token at its next position."""
        return self._append(self.last_tokens[:, None], self.last_tokens.new_ones(self.size, 1))

    def _append(self, ids: torch.Tensor, real: torch.Tensor) -> dict:
        """Inputs for ``ids`` [B, W] whose ``real`` [B, W] marks tokens (0: padding); the mask gains W columns."""
        self.mask = torch.cat([self.mask, real], dim=1)  # [B, L + W]
        positions = (self.mask.cumsum(dim=1)[:, -ids.shape[1]:] - 1).clamp(min=0)  # [B, W] real tokens before
        return {"input_ids": ids, "attention_mask": self.mask, "position_ids": positions}

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); cut the columns that are now padding everywhere."""
        if not rows:
            self.cache = self.mask = self.last_tokens = None
            return
        if rows == list(range(self.size)):
            return
        index = torch.tensor(rows)
        self.mask, self.last_tokens = self.mask[index], self.last_tokens[index]
        start = int((self.mask.sum(dim=0) > 0).nonzero()[0]) if self.mask.any() else self.length
        self.mask = self.mask[:, start:]
        if not _filled(self.cache):
            return
        for layer in self.cache.layers:
            # Indexing with a tensor copies, so the dropped rows' memory is released now.
            rows_here = index.to(layer.keys.device)
            layer.keys = layer.keys[rows_here, :, start:]
            layer.values = layer.values[rows_here, :, start:]

    def take(self, rows: list[int]) -> PaddedBatch:
        """Move ``rows`` out into a new batch (in that order); this batch keeps the others."""
        taken = PaddedBatch()
        taken.cache, taken.mask, taken.last_tokens = self.cache, self.mask, self.last_tokens
        moved = set(rows)
        rest = [r for r in range(self.size) if r not in moved]
        if rest and self.cache is not None:  # two batches, two cache objects over the same tensors until `keep`
            taken.cache = copy.copy(self.cache)
            taken.cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        taken.keep(rows)
        self.keep(rest)
        return taken
