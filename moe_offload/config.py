"""OffloadConfig: every knob of an offloaded model in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import MoEOffloadError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
CACHE_POLICIES = ("lru",)


def parse_bytes(value: int | float | str) -> int:
    """'6GiB', '500MB', '1.5 gib' or a plain number of bytes -> int bytes."""
    if isinstance(value, bool):
        raise MoEOffloadError(f"memory size {value!r} is not a size; give bytes or a string like '6GiB'")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise MoEOffloadError(f"memory size must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise MoEOffloadError(
            f"cannot read memory size {value!r}; use bytes or a number with a unit "
            "such as '6GiB', '500MB', '1.5GB'"
        )
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise MoEOffloadError(f"memory size must be positive, got {value!r}")
    return size


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None or 'auto' -> None (checkpoint's)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if str(value).lower() == "auto":
        return None
    name = str(value).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise MoEOffloadError(f"unknown dtype {value!r}; use one of float32, float16, bfloat16 or auto")
    return _DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class OffloadConfig:
    """How an MoE model is split between device and host and how experts move.

    Exactly one of ``gpu_memory`` (total device bytes the model may use: dense
    weights + KV reserve + expert slots) and ``expert_slots`` sets the size of
    the device expert cache; with neither, every routed expert gets a slot.
    """

    device: str = field(default_factory=default_device)
    dtype: torch.dtype | None = None          # None: the checkpoint's dtype
    gpu_memory: int | None = None             # bytes
    expert_slots: int | None = None
    cache_policy: str = "lru"
    kv_reserve_tokens: int = 2048             # KV cache kept free inside gpu_memory
    workspace_bytes: int = 64 * 2**20         # activations and allocator slack inside gpu_memory
    progress: bool = True                     # tqdm bar while loading experts

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.gpu_memory is not None:
            object.__setattr__(self, "gpu_memory", parse_bytes(self.gpu_memory))
        if self.gpu_memory is not None and self.expert_slots is not None:
            raise MoEOffloadError("give either gpu_memory or expert_slots, not both")
        if self.expert_slots is not None and int(self.expert_slots) < 1:
            raise MoEOffloadError(f"expert_slots must be at least 1, got {self.expert_slots}")
        if self.cache_policy not in CACHE_POLICIES:
            raise MoEOffloadError(
                f"unknown cache_policy {self.cache_policy!r}; choose one of {', '.join(CACHE_POLICIES)}"
            )
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MoEOffloadError("device 'cuda' requested but no CUDA GPU is visible; use device='cpu'")
        if device.type not in ("cuda", "cpu"):
            raise MoEOffloadError(f"device {self.device!r} is not supported; use 'cuda', 'cuda:N' or 'cpu'")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def replace(self, **fields: Any) -> "OffloadConfig":
        """A copy with ``fields`` changed; unknown names raise MoEOffloadError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise MoEOffloadError(
                f"unknown OffloadConfig field(s) {unknown}; known fields: {', '.join(sorted(known))}"
            )
        if "gpu_memory" in fields and fields["gpu_memory"] is not None:
            fields.setdefault("expert_slots", None)
        elif "expert_slots" in fields and fields["expert_slots"] is not None:
            fields.setdefault("gpu_memory", None)
        return dataclasses.replace(self, **fields)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "OffloadConfig":
        """Load from a YAML mapping of field names to values."""
        path = Path(path)
        if not path.is_file():
            raise MoEOffloadError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise MoEOffloadError(f"config file {path} must hold a mapping of OffloadConfig fields")
        return cls().replace(**data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dtype"] = None if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return out
