"""Quantize once: a model's packed experts saved to a safetensors file, read back on later loads.

The file holds one uint8 tensor per expert (``expert.<key>``, its packed row, one contiguous run on
disk) and, in the header's metadata, the key it was made for and a CRC-32 per expert. The key hashes
what the packed bytes depend on: the format and its quantizer version, the expert shape, the compute
dtype, and each checkpoint shard's name, size, modification time and safetensors header (tensor names,
dtypes, shapes and offsets). A file whose key, layout or checksums do not match is stale or corrupt:
it is never used, and the first load rebuilds it. safetensors has no streaming writer, so the file is
written expert by expert here (the format is an 8-byte header length, a JSON header, then the raw
bytes) and read back with safetensors' own reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..cpu_kernels.packed import QUANTIZER_VERSIONS, ExpertFormat
from ..transfer import HostExpertStore

FILE_VERSION = 1
GGUF_HEAD = 2**20


def default_folder() -> Path:
    """$XDG_CACHE_HOME/moe-offload/experts (~/.cache/... by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-offload" / "experts"


def cache_key(shards: list[Path], fmt: ExpertFormat, num_keys: int) -> str:
    """Hex digest of everything the packed bytes depend on (see the module docstring)."""
    digest = hashlib.sha256(json.dumps({
        "file": FILE_VERSION, "quantizer": QUANTIZER_VERSIONS[fmt.name], "format": fmt.name, "hidden": fmt.hidden,
        "inter": fmt.inter, "compute": str(fmt.compute_dtype), "keys": num_keys, "bytes": fmt.nbytes,
    }, sort_keys=True).encode())
    for shard in sorted(shards):
        stat = shard.stat()
        digest.update(f"{shard.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        with shard.open("rb") as f:
            if shard.suffix == ".gguf":    # GGUF: metadata and tensor table first (the first MiB holds them, or most)
                digest.update(f.read(GGUF_HEAD))
                continue
            (length,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(length))
    return digest.hexdigest()[:32]


def cache_path(folder: str | os.PathLike | None, key: str, fmt_name: str) -> Path:
    return Path(folder or default_folder()) / f"experts-{fmt_name}-{key}.safetensors"


def load_cached(path: Path, key: str, store: HostExpertStore, progress: bool) -> bool:
    """Fill ``store`` from the cache file at ``path`` if it exists and matches ``key`` in full; False (and a
    warning when a file was there) otherwise."""
    if not path.is_file():
        return False
    try:
        _read(path, key, store, progress)
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        warnings.warn(f"quantized-experts cache {path} is stale or corrupt ({err}); rebuilding it", stacklevel=3)
        store.filled[:] = False
        return False
    store.filled[:] = True
    return True


def _read(path: Path, key: str, store: HostExpertStore, progress: bool) -> None:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            raise ValueError("made for another checkpoint, format or version")
        crcs = _crcs(meta)
        if len(crcs) != store.num_keys:
            raise ValueError(f"{len(crcs)} experts, the model has {store.num_keys}")
        for k in tqdm(range(store.num_keys), desc="experts <- quantized cache", unit="expert",
                      disable=not progress, leave=False):
            row = f.get_tensor(f"expert.{k}")
            if row.dtype != torch.uint8 or row.shape != (store.format.nbytes,):
                raise ValueError(f"expert {k} has {row.dtype} {tuple(row.shape)}")
            if zlib.crc32(row.numpy()) != crcs[k]:
                raise ValueError(f"expert {k} fails its checksum")
            store.blocks[k].copy_(row)


def _crcs(meta: dict) -> list[int]:
    text = meta["crc32"]
    return [int(text[i: i + 8], 16) for i in range(0, len(text), 8)]


def cached_offsets(path: Path, key: str, num_keys: int, nbytes: int) -> list[int] | None:
    """File offsets of each expert's row in a cache file made for ``key`` (header and size checked; each
    expert's checksum is checked when it is read: ``check_row``); None (with a warning if a file was
    there) when there is no usable file."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        with path.open("rb") as raw:
            (length,) = struct.unpack("<Q", raw.read(8))
        if meta.get("key") != key or len(_crcs(meta)) != num_keys:
            raise ValueError("made for another checkpoint, format or version")
        if path.stat().st_size != 8 + length + num_keys * nbytes:
            raise ValueError("truncated")
    except (SafetensorError, OSError, ValueError, KeyError, struct.error) as err:
        warnings.warn(f"quantized-experts cache {path} is stale or corrupt ({err}); rebuilding it", stacklevel=3)
        return None
    return [8 + length + k * nbytes for k in range(num_keys)]


def row_checksums(path: Path) -> list[int]:
    """The per-expert CRC-32s a cache file's header records."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return _crcs(f.metadata())


def save_cache(path: Path, key: str, store: HostExpertStore) -> None:
    """Write the store's packed rows to ``path``."""
    write_rows(path, key, store.format, store.num_keys, lambda k, row: row.copy_(store.block(k)), progress=False)


def write_rows(path: Path, key: str, fmt: ExpertFormat, num_keys: int, fill, progress: bool) -> None:
    """Write ``num_keys`` packed rows, row k made by ``fill(k, row)``, one at a time (the experts never need
    to be in memory together), through a temporary file renamed when complete. The header has a fixed
    size (8 hex digits of CRC-32 per expert), so it is written first and completed at the end. A folder that
    cannot be written only costs the next load its quantization: warn and go on."""
    nbytes = fmt.nbytes
    crcs = ["00000000"] * num_keys

    def header() -> bytes:
        meta = {"__metadata__": {"key": key, "format": fmt.name, "crc32": "".join(crcs)}}
        for k in range(num_keys):
            meta[f"expert.{k}"] = {"dtype": "U8", "shape": [nbytes], "data_offsets": [k * nbytes, (k + 1) * nbytes]}
        raw = json.dumps(meta, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)              # the data starts 8-byte aligned

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    row = torch.zeros(fmt.row_numel, dtype=fmt.row_dtype).view(torch.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            first = header()
            f.write(struct.pack("<Q", len(first)) + first)
            for k in tqdm(range(num_keys), desc=f"experts -> {fmt.name} cache file", unit="expert",
                          disable=not progress, leave=False):
                fill(k, row.view(fmt.row_dtype))
                crcs[k] = f"{zlib.crc32(row.numpy()):08x}"
                f.write(memoryview(row.numpy()))
            f.seek(8)
            f.write(header())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the quantized-experts cache {path} ({err}); the next load quantizes "
                      "again (set quant_cache to a writable folder)", stacklevel=3)
