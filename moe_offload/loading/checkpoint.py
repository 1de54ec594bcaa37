"""A local HF checkpoint directory: config, safetensors shards, validated before any load."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import MoEOffloadError

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A directory path, a shipped model's short name (e.g. 'tiny-mixtral') or a shape preset's
    ('mixtral-8x7b': its config.json only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from ..models import preset_dir, shipped_model_dir  # both live inside the package

    shipped = shipped_model_dir(str(model)) or preset_dir(str(model))
    if shipped is not None:
        return shipped
    if path.exists():
        raise MoEOffloadError(f"model path {path} is a file; give the checkpoint directory that holds config.json")
    raise MoEOffloadError(
        f"model directory {path} does not exist; give a local HF checkpoint directory "
        "(config.json + *.safetensors), a shipped model name such as 'tiny-mixtral' or a shape preset such as "
        "'mixtral-8x7b' (config only: for info and sweep --simulate)"
    )


@dataclass(frozen=True)
class TensorInfo:
    shard: Path
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a shard's header; raise MoEOffloadError if corrupt or truncated."""
    size = path.stat().st_size
    fix = f"re-download or re-save the checkpoint ({path.name})"
    if size < 8:
        raise MoEOffloadError(f"shard {path} is truncated ({size} bytes); {fix}")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER):
            raise MoEOffloadError(f"shard {path} has a corrupt safetensors header (length {header_len}); {fix}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MoEOffloadError(f"shard {path} has a corrupt safetensors header ({err}); {fix}") from None
    if not isinstance(header, dict):
        raise MoEOffloadError(f"shard {path} has a corrupt safetensors header; {fix}")
    tensors, data_end = {}, 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]))
            data_end = max(data_end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise MoEOffloadError(f"shard {path} has a corrupt entry for tensor {name!r}; {fix}") from None
    if 8 + header_len + data_end > size:
        raise MoEOffloadError(
            f"shard {path} is truncated: header promises {8 + header_len + data_end} bytes, file has {size}; {fix}"
        )
    return tensors


class Checkpoint:
    """Tensor names -> shards of one checkpoint directory, with open readers reused."""

    def __init__(self, directory: Path):
        self.directory = directory
        if not (directory / "config.json").is_file():
            raise MoEOffloadError(f"{directory} has no config.json; is it a transformers checkpoint directory?")
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self._shards():
            self.tensors.update(read_safetensors_header(shard))
        self._readers: dict[Path, object] = {}

    def _shards(self) -> list[Path]:
        index = self.directory / _INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MoEOffloadError(f"{index} is not a valid safetensors index; re-save the checkpoint") from None
            shards = sorted({self.directory / name for name in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise MoEOffloadError(
                    f"shard(s) {', '.join(missing)} listed in {index.name} are missing from {self.directory}; "
                    "download the complete checkpoint"
                )
            return shards
        if (self.directory / _SINGLE).is_file():
            return [self.directory / _SINGLE]
        found = sorted(self.directory.glob("*.safetensors"))
        if found:
            return found
        raise MoEOffloadError(
            f"{self.directory} has no safetensors weights ({_SINGLE} or {_INDEX}); "
            "only safetensors checkpoints are supported (re-save with save_pretrained)"
        )

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (only that tensor's bytes) from its shard."""
        shard = self.tensors[name].shard
        if shard not in self._readers:
            self._readers[shard] = safe_open(str(shard), framework="pt", device="cpu")
        return self._readers[shard].get_tensor(name)

    def get_slice(self, name: str, index: int) -> torch.Tensor:
        """Row ``index`` of a tensor's first dimension, without reading the rest."""
        shard = self.tensors[name].shard
        if shard not in self._readers:
            self._readers[shard] = safe_open(str(shard), framework="pt", device="cpu")
        return self._readers[shard].get_slice(name)[index]

    def close(self) -> None:
        self._readers.clear()
