"""A GGUF checkpoint (llama.cpp's file: one file, or a split set -00001-of-0000N.gguf), read with the
``gguf`` package's GGUFReader and shown to the loader under transformers' tensor names.

- the transformers config comes from the file's metadata (llama.cpp's keys, per architecture: ``CONFIGS``);
  Mixtral is llama.cpp's ``llama`` architecture with experts;
- dense tensors are dequantized on read (``gguf.quants.dequantize``) to float32, the loader casts them to
  the model's dtype; llama.cpp's row permutation of the llama architecture's q and k projections (for its
  rotary layout) is undone;
- routed experts (``blk.L.ffn_{gate,up,down}_exps``: [E, I, H], [E, I, H], [E, H, I], blocks along the
  input) appear as fused ``model.layers.L.mlp.experts.gate_up_proj`` [E, 2I, H] and ``down_proj``
  [E, H, I]; ``expert_bytes`` gives one expert's projection as the file stores it (for the GGUF expert
  format) and ``get_slice`` the dequantized values (for any other expert format).

Every check (magic, truncation, architecture, tensor types, shapes) happens in ``__init__`` and ``bind``,
before anything is loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cpu_kernels.ggml_blocks import GGML_TYPES, PLAIN, GGMLType
from ..cpu_kernels.ggml_dequant import dequantize_cpu
from ..errors import MoEOffloadError

_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_EXPERTS = re.compile(r"^blk\.(?P<layer>\d+)\.ffn_(?P<proj>gate|up|down)_exps\.weight$")
ROLE_OF = {"gate": "gate", "up": "up", "down": "down"}
_INSTALL = "install the gguf package: pip install 'moe-offload[gguf]'"


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def split_files(path: Path) -> list[Path]:
    """The files of a GGUF checkpoint: ``path`` alone, or every file of its split set (given the first)."""
    m = _SPLIT.match(path.name)
    if m is None:
        return [path]
    if int(m["no"]) != 1:
        raise MoEOffloadError(f"{path} is part {int(m['no'])} of a split GGUF; give the first file, "
                              f"{m['stem']}-00001-of-{m['count']}.gguf")
    files = [path.with_name(f"{m['stem']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, int(m["count"]) + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MoEOffloadError(f"split GGUF {path.name}: part(s) {', '.join(missing)} are missing from "
                              f"{path.parent}; download every part")
    return files


@dataclass(frozen=True)
class GGUFTensorInfo:
    """A tensor as the loader sees it (transformers' name and shape), and where its bytes are."""

    shard: Path                       # the file that holds it
    dtype: str                        # what it reads as: 'F32' (dequantized on read)
    shape: tuple[int, ...]            # transformers' shape
    ggml_type: str                    # the file's type name (Q4_K, F16, ...)
    offset: int = 0
    nbytes: int = 0


@dataclass(frozen=True)
class _Stored:
    """One tensor of the file: its GGUF name, type, numpy shape ([..., rows, columns]) and bytes."""

    name: str
    file: Path
    type_id: int
    type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    data: np.ndarray                  # the reader's memory-mapped view


def _read_file(path: Path):
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as err:
        raise MoEOffloadError(f"{path} is not a readable GGUF file ({err}); it is truncated or corrupt: "
                              "re-download it") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise MoEOffloadError(f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                                  f"the file has {size}; re-download it")
    return reader


def _dequantize(data: np.ndarray, type_id: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 values [*shape] of a tensor's bytes ``data`` (the reader's view): the Numba kernels for the block
    types the engine reads (bit for bit the gguf package's values, on every core), the gguf package's own
    dequantization for the rest."""
    from gguf import GGMLQuantizationType, dequantize

    ggml_type = GGML_TYPES.get(type_id)
    if ggml_type is not None and ggml_type.name not in PLAIN:
        columns = shape[-1]
        return dequantize_cpu(data, ggml_type, int(np.prod(shape)) // columns, columns).reshape(shape)
    return torch.from_numpy(np.array(dequantize(data, GGMLQuantizationType(type_id)), dtype=np.float32))


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


class GGUFCheckpoint:
    """A GGUF checkpoint: metadata, the tensor table of every file, and reads of single tensors."""

    def __init__(self, path: Path):
        try:
            import gguf  # noqa: F401  (the format's own reader)
        except ImportError:
            raise MoEOffloadError(f"{path} is a GGUF file; {_INSTALL}") from None
        self.path = path
        self.files = split_files(path)
        self.readers = [_read_file(f) for f in self.files]
        self.metadata = self.readers[0]
        self.architecture = str(_field(self.metadata, "general.architecture", ""))
        self.stored: dict[str, _Stored] = {}
        for file, reader in zip(self.files, self.readers):
            for t in reader.tensors:
                self.stored[t.name] = _Stored(t.name, file, int(t.tensor_type), t.tensor_type.name,
                                              tuple(int(d) for d in reversed(t.shape.tolist())),
                                              int(t.data_offset), int(t.n_bytes), t.data)
        self.quantization = None       # no quantization_config: the file's types are per tensor
        self.scales: dict = {}         # no block-FP8 scales
        self.int4: dict = {}           # no GPTQ/AWQ int4 parts
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self._names: dict[str, list[str]] = {}    # transformers name -> its GGUF tensor(s) (dense tensors)
        self._experts: dict[int, dict[str, _Stored]] = {}   # model layer -> {gate, up, down}
        for name, t in self.stored.items():
            m = _EXPERTS.match(name)
            if m:
                self._experts.setdefault(int(m["layer"]), {})[m["proj"]] = t

    # -- config --------------------------------------------------------------------------------------------------
    def field(self, key: str, default=None):
        """Metadata value ``key`` (an ``{arch}.`` prefix may be left out: '.block_count')."""
        if key.startswith("."):
            key = self.architecture + key
        return _field(self.metadata, key, default)

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self._experts)

    def describe(self) -> str:
        """'GGUF (llama, file type Q4_K_M): tensor types Q4_K x 64, Q6_K x 9, F32 x 17'."""
        counts: dict[str, int] = {}
        for t in self.stored.values():
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        kinds = ", ".join(f"{k} x {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        ftype = self.field("general.file_type")
        from gguf import LlamaFileType

        try:
            ftype_name = LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else "unknown"
        except ValueError:
            ftype_name = str(ftype)
        split = f", {len(self.files)} files" if len(self.files) > 1 else ""
        return f"GGUF ({self.architecture}, file type {ftype_name}{split}): tensor types {kinds}"

    # -- names ---------------------------------------------------------------------------------------------------
    def bind(self, model: torch.nn.Module, expert_layers: list[int], num_experts: int, hidden: int,
             inter: int) -> None:
        """Name every file tensor after ``model``'s (the skeleton built from this file's config): fills
        ``tensors``. Raise MoEOffloadError for a tensor of a type this reader does not dequantize, or a
        routed-expert tensor whose shape the config does not imply."""
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

        arch = next(k for k, v in MODEL_ARCH_NAMES.items() if v == self.architecture)
        name_map = get_tensor_name_map(arch, model.config.num_hidden_layers)
        targets = dict(model.named_parameters()) | dict(model.named_buffers())
        for hf_name in targets:
            stored = self._stored_for(name_map, hf_name)
            if stored is None:
                continue
            for part in stored:
                self._check_type(part)
            self._names[hf_name] = [t.name for t in stored]
            first, numel = stored[0], sum(int(np.prod(t.shape)) for t in stored)
            shape = tuple(targets[hf_name].shape) if numel == targets[hf_name].numel() else first.shape
            self.tensors[hf_name] = GGUFTensorInfo(first.file, "F32", shape, first.type_name, first.offset,
                                                   sum(t.nbytes for t in stored))
        for layer, projs in self._experts.items():
            if layer not in expert_layers:
                raise MoEOffloadError(f"{self.path}: blk.{layer} has routed experts but the metadata makes layer "
                                      f"{layer} dense; the file is corrupt")
            self._bind_experts(layer, projs, num_experts, hidden, inter)

    def _stored_for(self, name_map, hf_name: str) -> list[_Stored] | None:
        """The file tensor(s) holding transformers tensor ``hf_name``: one, or DeepSeek's kv_b_proj as the
        two halves llama.cpp splits it into (attn_k_b, attn_v_b); None if the file has none."""
        module, _, leaf = hf_name.rpartition(".")
        base = name_map.get_name(module)
        # a router's e_score_correction_bias: llama.cpp names it as 'e_score_correction' with a .bias leaf
        biased = name_map.get_name(hf_name.removesuffix("_bias"))
        for candidate in (f"{base}.{leaf}", f"{biased}.bias"):
            if candidate in self.stored:
                return [self.stored[candidate]]
        if base is not None and base.endswith(".attn_kv_b") and f"{base[:-5]}_k_b.{leaf}" in self.stored:
            return [self.stored[f"{base[:-5]}_k_b.{leaf}"], self.stored[f"{base[:-5]}_v_b.{leaf}"]]
        return None

    def _bind_experts(self, layer: int, projs: dict, num_experts: int, hidden: int, inter: int) -> None:
        want = {"gate": (num_experts, inter, hidden), "up": (num_experts, inter, hidden),
                "down": (num_experts, hidden, inter)}
        for proj, t in projs.items():
            if tuple(t.shape) != want[proj]:
                raise MoEOffloadError(f"{self.path}: tensor {t.name} has shape {list(t.shape)} but the metadata "
                                      f"implies {list(want[proj])}; the file is corrupt or not this model's")
        base = f"model.layers.{layer}.mlp.experts"
        if "gate" in projs and "up" in projs:
            g = projs["gate"]
            self.tensors[f"{base}.gate_up_proj"] = GGUFTensorInfo(g.file, "F32", (num_experts, 2 * inter, hidden),
                                                                  g.type_name, g.offset, g.nbytes)
        if "down" in projs:
            d = projs["down"]
            self.tensors[f"{base}.down_proj"] = GGUFTensorInfo(d.file, "F32", (num_experts, hidden, inter),
                                                               d.type_name, d.offset, d.nbytes)

    def _check_type(self, t: _Stored) -> None:
        """A dense tensor: any type the gguf package dequantizes."""
        from gguf import GGMLQuantizationType
        from gguf.quants import _type_traits

        if t.type_id not in (0, 1) and GGMLQuantizationType(t.type_id) not in _type_traits:
            raise MoEOffloadError(f"{self.path}: tensor {t.name} is {t.type_name}, a type the gguf package cannot "
                                  "dequantize; use a file quantized to a common type (Q8_0, Q4_K_M, ...)")

    def unread_expert_types(self) -> dict[str, str]:
        """Routed-expert tensors whose type the GGUF expert format does not keep: {tensor name: type}."""
        return {t.name: t.type_name for projs in self._experts.values() for t in projs.values()
                if t.type_id not in GGML_TYPES}

    # -- reads ---------------------------------------------------------------------------------------------------
    def _dequantized(self, t: _Stored) -> torch.Tensor:
        return _dequantize(t.data, t.type_id, t.shape)

    def get(self, name: str) -> torch.Tensor:
        """A dense tensor under its transformers name, dequantized to float32 (llama's q/k permutation and
        DeepSeek's kv_b split undone)."""
        info = self.tensors[name]
        stored = [self.stored[n] for n in self._names[name]]
        if len(stored) == 2:
            return self._kv_b(*stored).reshape(info.shape)
        return self._unpermute(stored[0].name, self._dequantized(stored[0]).reshape(info.shape))

    def _kv_b(self, k_b: _Stored, v_b: _Stored) -> torch.Tensor:
        """DeepSeek's kv_b_proj [heads * (nope + v), kv_lora_rank] from llama.cpp's k_b [heads, rank, nope]
        (transposed per head) and v_b [heads, v, rank]."""
        k = self._dequantized(k_b).reshape(k_b.shape).transpose(1, 2)          # [heads, nope, rank]
        v = self._dequantized(v_b).reshape(v_b.shape)                          # [heads, v, rank]
        return torch.cat([k, v], dim=1).reshape(-1, k.shape[-1])

    def _unpermute(self, gguf_name: str, w: torch.Tensor) -> torch.Tensor:
        """llama.cpp writes the llama architecture's q and k rows interleaved per head (rotary pairs
        adjacent); transformers keeps each head's halves apart. Undo it."""
        if self.architecture != "llama" or not re.search(r"\.attn_[qk]\.weight$", gguf_name):
            return w
        heads = self.field(".attention.head_count")
        if ".attn_k." in gguf_name:
            heads = self.field(".attention.head_count_kv", heads)
        rows = w.shape[0]
        return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    def _expert_proj(self, layer: int, proj: str) -> _Stored:
        return self._experts[layer][proj]

    def get_slice(self, name: str, index: int) -> torch.Tensor:
        """Expert ``index`` of a fused routed-expert tensor, dequantized to float32 ([2I, H] or [H, I])."""
        layer = int(name.split(".")[2])
        projs = ("gate", "up") if name.endswith("gate_up_proj") else ("down",)
        return torch.cat([self._dequantized_expert(layer, p, index) for p in projs])

    def _dequantized_expert(self, layer: int, proj: str, index: int) -> torch.Tensor:
        t = self._expert_proj(layer, proj)
        return _dequantize(t.data[index], t.type_id, t.shape[1:])

    def expert_type(self, layer: int, proj: str) -> GGMLType:
        return GGML_TYPES[self._expert_proj(layer, proj).type_id]

    def expert_bytes(self, layer: int, proj: str, index: int) -> torch.Tensor:
        """Expert ``index``'s projection ``proj`` of model layer ``layer`` as the file stores it (uint8)."""
        t = self._expert_proj(layer, proj)
        return torch.from_numpy(np.ascontiguousarray(t.data[index]).view(np.uint8).reshape(-1))

    def expert_run(self, layer: int, proj: str, index: int) -> tuple[str, int, int]:
        """(file, byte offset, bytes) of expert ``index``'s projection ``proj``: one contiguous run."""
        t = self._expert_proj(layer, proj)
        size = t.nbytes // t.shape[0]
        return str(t.file), t.offset + index * size, size

    def shards(self) -> list[Path]:
        return list(self.files)

    def close(self) -> None:
        """Drop the readers' memory maps (pages read through them would stay resident)."""
        self.stored.clear()
        self._experts.clear()
        self.readers.clear()
