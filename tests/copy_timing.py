"""Copy timings the ordering-sensitive parity suites run under.

``immediate``: every copy lands when issued. ``deferred-N``: copies land late, in
an order drawn with seed N among those their dependencies allow. ``held-N``: the
same, and prefetches are held in the copy engine's queue (no prefetch chunk may
be on the stream), as behind a busy PCIe link: a prefetch lands only when its
layer needs it.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

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

_REFS: dict = {}


def reference(path, tokens: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain transformers (fp32): logits on ``tokens`` [1, S] and the greedy continuation of its first 4
    tokens by ``new_tokens``; made once per checkpoint and inputs."""
    key = (str(path), tuple(tokens.flatten().tolist()), new_tokens)
    if key not in _REFS:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            _REFS[key] = ref(tokens).logits, ref.generate(tokens[:, :4], **greedy(new_tokens))
    return _REFS[key]


def greedy(new_tokens: int) -> dict:
    """generate() arguments for exactly ``new_tokens`` greedy tokens."""
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
