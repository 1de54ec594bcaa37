"""Record routing traces from a running model, once: ``cached_trace`` keeps them in a cache folder."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..predictor import Trace
from ..predictor.trace import TRACE_VERSION, TraceFormatError
from .router_tap import RouterTap

# N = tokens, L = MoE layers, k = experts per token, E = experts, H = hidden size


class TraceRecorder:
    """Listener that stores each router call; ``trace()`` stacks them token by token. Router scores are
    kept as ``scores_dtype`` (float16, as trace files store them; float32 keeps what the engine's policy saw)."""

    def __init__(self, num_layers: int, gate_inputs: bool, scores_dtype: torch.dtype = torch.float16):
        self.num_layers = num_layers
        self.keep_gate_inputs = gate_inputs
        self.scores_dtype = scores_dtype
        self.calls: list[list[tuple]] = [[] for _ in range(num_layers)]
        self.sequence: list[int] = []
        self.decode: list[bool] = []
        self._seq = 0

    def __call__(self, layer: int, gate_input: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        gi = gate_input.to(torch.float16).cpu().numpy() if self.keep_gate_inputs else None
        self.calls[layer].append((chosen.cpu().numpy().astype(np.int16), probs.to(self.scores_dtype).cpu().numpy(), gi))
        if layer == 0:  # one entry per token, counted at the first MoE layer
            n = chosen.shape[0]
            first_call = not self.sequence or self.sequence[-1] != self._seq
            self.sequence.extend([self._seq] * n)
            self.decode.extend([not first_call] * n)

    def next_sequence(self) -> None:
        self._seq += 1

    def trace(self, meta: dict) -> Trace:
        def stack(i: int) -> np.ndarray:
            return np.stack([np.concatenate([c[i] for c in calls]) for calls in self.calls], axis=1)

        return Trace(stack(0), stack(1), np.asarray(self.sequence, np.int32), np.asarray(self.decode, bool),
                     stack(2) if self.keep_gate_inputs else None, meta)


def record_trace(model, tokenizer, prompts: list, max_new_tokens: int, gate_inputs: bool = False,
                 progress: bool = True, min_new_tokens: int | None = None) -> Trace:
    """Greedy-generate from each prompt (batch 1) and record every router call. A prompt is text (encoded
    with ``tokenizer``) or a [1, S] tensor of token ids (``tokenizer`` may then be None)."""
    tap: RouterTap = model.offload.router_tap
    recorder = TraceRecorder(len(tap.routers), gate_inputs)
    pad = 0 if tokenizer is None else tokenizer.pad_token_id or tokenizer.eos_token_id or 0
    tap.add(recorder)
    try:
        with torch.inference_mode():
            for prompt in tqdm(prompts, desc="tracing", unit="prompt", disable=not progress):
                ids = tokenizer(prompt, return_tensors="pt").input_ids if isinstance(prompt, str) else prompt
                model.generate(ids.to(model.device), max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                               do_sample=False, pad_token_id=pad)
                recorder.next_sequence()
    finally:
        tap.remove(recorder)
    off = model.offload
    meta = {"model": str(model.config._name_or_path), "model_type": model.config.model_type,
            "moe_layers": off.moe_layers}
    return recorder.trace(meta)


HASHED_FILE_BYTES = 256 * 2**20     # weight files up to this size are hashed in full; larger ones by header


def default_trace_folder() -> Path:
    """$XDG_CACHE_HOME/moe-offload/traces (~/.cache/... by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-offload" / "traces"


def trace_key(model, prompts: list[str], max_new_tokens: int, gate_inputs: bool) -> str:
    """Hex digest of what a recorded trace depends on: the trace format, the recipe (prompts, tokens generated,
    gate inputs), the model's compute dtype and device type, its config.json and its weights (files up to
    HASHED_FILE_BYTES by content; larger ones by name, size, modification time and safetensors header)."""
    directory = Path(model.config._name_or_path)
    digest = hashlib.sha256(json.dumps({
        "trace_version": TRACE_VERSION, "prompts": prompts, "max_new_tokens": max_new_tokens,
        "gate_inputs": gate_inputs, "dtype": str(model.dtype), "device": model.device.type,
        "model_type": model.config.model_type,
    }, sort_keys=True).encode())
    hash_checkpoint(digest, directory)
    return digest.hexdigest()[:24]


def hash_checkpoint(digest, directory: Path) -> None:
    """Feed ``digest`` what a checkpoint directory's results depend on: its config.json and weight files (files
    up to HASHED_FILE_BYTES by content; larger ones by name, size, modification time and safetensors header)."""
    for file in sorted(directory.glob("config.json")) + sorted(directory.glob("*.safetensors")):
        digest.update(file.name.encode())
        _hash_file(digest, file)


def _hash_file(digest, file: Path) -> None:
    stat = file.stat()
    with file.open("rb") as f:
        if stat.st_size <= HASHED_FILE_BYTES:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
            return
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        (length,) = struct.unpack("<Q", f.read(8))
        digest.update(f.read(length))


def cached_trace(model, tokenizer, prompts: list[str], max_new_tokens: int, gate_inputs: bool,
                 folder: str | os.PathLike | None = None, label: str = "trace", meta: dict | None = None,
                 progress: bool = True) -> tuple[Trace, Path, bool]:
    """(trace, its cache file, whether it was read from the cache). The trace of ``record_trace`` for these
    prompts and settings, read from ``folder`` (default ``default_trace_folder()``) when an earlier run
    recorded it, else recorded (``meta`` added to its metadata) and saved there (written to a temporary name,
    then renamed, so a reader never sees half a file). A file that does not load is recorded again."""
    key = trace_key(model, prompts, max_new_tokens, gate_inputs)
    path = Path(folder or default_trace_folder()) / f"{Path(model.config._name_or_path).name}-{label}-{key}.npz"
    if path.is_file():
        try:
            return Trace.load(path), path, True
        except TraceFormatError:
            pass
    trace = record_trace(model, tokenizer, prompts, max_new_tokens, gate_inputs=gate_inputs, progress=progress)
    trace.meta |= (meta or {}) | {"cache_key": key}
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    trace.save(partial)
    partial.replace(path)
    return trace, path, False
