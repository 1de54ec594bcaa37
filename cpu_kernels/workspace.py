"""Reusable float32 buffers: allocated on first use, grown only when a larger size is asked."""

from __future__ import annotations

import numpy as np


class Workspace:
    """Named float32 buffers handed out as [rows, cols] views of one flat allocation each.

    A view stays valid until the same name is requested again; callers that need two live
    buffers use two names. After one request at the largest size nothing is allocated.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, rows: int, cols: int) -> np.ndarray:
        """A float32 [rows, cols] C-contiguous view of buffer `name` (contents undefined)."""
        size = rows * cols
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, 1), dtype=np.float32)
            self._buffers[name] = buf
        return buf[:size].reshape(rows, cols)

    def reserve(self, name: str, size: int) -> None:
        """Allocate buffer `name` with at least `size` floats now (e.g. at load)."""
        self.get(name, 1, size)

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(buf.nbytes for buf in self._buffers.values())
