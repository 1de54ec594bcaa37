"""A local HF checkpoint directory: config, safetensors shards (unquantized, block FP8 or int4), validated before
any load."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import MoEOffloadError
from .block_fp8 import SCALE_SUFFIX, BlockFP8, FP8Weight, checkpoint_format, split_scales
from .int4_checkpoint import Int4Checkpoint, Int4Tensors, Int4Weight, read_int4, split_int4

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
        raise MoEOffloadError(f"model path {path} is a file; give the checkpoint directory that holds config.json, "
                              "or a GGUF file (.gguf)")
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
    offset: int = 0     # file offset of the tensor's first byte (for positional reads)
    nbytes: int = 0


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
            begin, end = (int(x) for x in meta["data_offsets"])
            tensors[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), 8 + header_len + begin, end - begin)
            data_end = max(data_end, end)
        except (KeyError, TypeError, IndexError, ValueError):
            raise MoEOffloadError(f"shard {path} has a corrupt entry for tensor {name!r}; {fix}") from None
    if 8 + header_len + data_end > size:
        raise MoEOffloadError(
            f"shard {path} is truncated: header promises {8 + header_len + data_end} bytes, file has {size}; {fix}"
        )
    return tensors


def read_format(directory: Path) -> BlockFP8 | Int4Checkpoint | None:
    """The weight format config.json declares (None: unquantized); MoEOffloadError for one not read."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoEOffloadError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    return checkpoint_format(config.get("quantization_config") if isinstance(config, dict) else None, path)


class Checkpoint:
    """Tensor names -> shards of one checkpoint directory, with open readers reused.

    ``quantization`` is the format config.json declares: None (tensors are read as stored), BlockFP8,
    whose float8 weights ``get`` and ``get_slice`` return dequantized to float32 with their
    ``*_scale_inv`` (kept in ``scales``, keyed by the weight's name, not in ``tensors``: they are no model
    tensors), or an Int4Checkpoint, whose packed weights appear in ``tensors`` as ``P.weight`` [N, K] and
    in ``int4`` (their stored parts), and ``get`` returns dequantized to float32. ``fp8_weight`` and
    ``fp8_weight_slice`` give the stored bytes and scales, for a store that keeps experts in fp8;
    ``int4_weight`` the codes, scales and zeros, for one that keeps them in int4."""

    def __init__(self, directory: Path):
        self.directory = directory
        if not (directory / "config.json").is_file():
            raise MoEOffloadError(f"{directory} has no config.json; is it a transformers checkpoint directory?")
        self.quantization: BlockFP8 | Int4Checkpoint | None = read_format(directory)
        stored: dict[str, TensorInfo] = {}
        for shard in self._shards():
            stored.update(read_safetensors_header(shard))
        self._readers: dict[Path, object] = {}
        self._stored = stored
        self.tensors: dict[str, TensorInfo]      # model tensors; an fp8 weight keeps its stored dtype F8_E4M3
        self.scales: dict[str, TensorInfo] = {}  # fp8 weight name -> its scale_inv
        self.int4: dict[str, Int4Tensors] = {}   # int4 weight name (P.weight) -> its stored parts
        if isinstance(self.quantization, Int4Checkpoint):
            self.tensors, self.int4 = split_int4(self.quantization, stored, self._read_stored, directory)
        else:
            self.tensors, self.scales = split_scales(self.quantization, stored, directory)

    @property
    def reads_as_stored(self) -> bool:
        """Whether every tensor's bytes are its values (no fp8 scales, no int4 packing)."""
        return not self.scales and not self.int4

    def _read_stored(self, name: str) -> torch.Tensor:
        """A stored tensor by its name in the shards (an int4 weight's parts included)."""
        return self._reader(self._stored[name]).get_tensor(name)

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

    def _reader(self, info: TensorInfo):
        """The open safetensors reader of ``info``'s shard (opened once)."""
        if info.shard not in self._readers:
            self._readers[info.shard] = safe_open(str(info.shard), framework="pt", device="cpu")
        return self._readers[info.shard]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (only that tensor's bytes) from its shard; an fp8 weight dequantized to float32."""
        if name in self.scales:
            return self.fp8_weight(name).dequantize()
        if name in self.int4:
            return self.int4_weight(name).dequantize()
        return self._reader(self.tensors[name]).get_tensor(name)

    def get_slice(self, name: str, index: int) -> torch.Tensor:
        """Row ``index`` of a tensor's first dimension (a fused [E, O, I] tensor's expert ``index``), without
        reading the rest; a fused fp8 weight's expert dequantized to float32 with its own scales."""
        if name in self.int4:
            return self.get(name)[index]
        if name not in self.scales:
            return self._reader(self.tensors[name]).get_slice(name)[index]
        if len(self.tensors[name].shape) == 2:   # a matrix row: dequantized whole (fused experts are 3-D)
            return self.get(name)[index]
        return self.fp8_weight_slice(name, index).dequantize()

    def fp8_weight(self, name: str) -> FP8Weight:
        """An fp8 weight (``name in scales``) as stored: (q float8_e4m3fn [O, I] or [E, O, I], scale_inv
        float32 [ceil(O/BO), ceil(I/BI)] or [E, ...], block (BO, BI)), for a store that keeps fp8 bytes."""
        if name not in self.scales:
            raise KeyError(f"{name} is not an fp8 weight of {self.directory}")
        q = self._reader(self.tensors[name]).get_tensor(name)
        scale = self._reader(self.scales[name]).get_tensor(name + SCALE_SUFFIX)
        return FP8Weight(q, scale, self.quantization.block)

    def int4_weight(self, name: str) -> Int4Weight:
        """An int4 weight (``name in int4``) as the checkpoint defines it: codes in the project's byte order,
        its scales and integer zeros (see int4_checkpoint.py)."""
        return read_int4(self.quantization, self.int4[name], self._read_stored)

    def fp8_weight_slice(self, name: str, index: int) -> FP8Weight:
        """Expert ``index`` of a fused fp8 weight [E, O, I] as stored, reading only its bytes: (q [O, I],
        scale_inv [ceil(O/BO), ceil(I/BI)], block)."""
        if name not in self.scales or len(self.tensors[name].shape) != 3:
            raise KeyError(f"{name} is not a fused [E, O, I] fp8 weight of {self.directory}")
        q = self._reader(self.tensors[name]).get_slice(name)[index]
        scale = self._reader(self.scales[name]).get_slice(name + SCALE_SUFFIX)[index]
        return FP8Weight(q, scale, self.quantization.block)

    def close(self) -> None:
        self._readers.clear()
