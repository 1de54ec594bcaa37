"""Copy timings the ordering-sensitive parity suites run under.

``immediate``: every copy lands when issued. ``deferred-N``: copies land late, in
an order drawn with seed N among those their dependencies allow. ``held-N``: the
same, and prefetches are held in the copy engine's queue (no prefetch chunk may
be on the stream), as behind a busy PCIe link: a prefetch lands only when its
layer needs it.
"""

from __future__ import annotations

import torch

import moe_offload

COPY_TIMINGS = ["immediate", "deferred-1", "deferred-2", "held-3"]


def load(path, timing: str = "immediate", **fields):
    """An offloaded fp32 CPU model whose copies land as ``timing`` says."""
    backend, _, seed = timing.partition("-")
    held = backend == "held"
    fields = dict(device="cpu", dtype=torch.float32, progress=False) | fields
    model = moe_offload.from_pretrained(path, copy_backend="deferred" if held else backend,
                                        copy_seed=int(seed or 0), **fields)
    if held:
        model.offload.engine.copier.max_prefetch_inflight = 0
    return model
