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

from ..cpu_kernels.packed import QUANTIZER_VERSION
from ..transfer import HostExpertStore

FILE_VERSION = 1


def default_folder() -> Path:
    """$XDG_CACHE_HOME/moe-offload/experts (~/.cache/... by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-offload" / "experts"


def cache_key(shards: list[Path], store: HostExpertStore) -> str:
    """Hex digest of everything the packed bytes depend on (see the module docstring)."""
    fmt = store.format
    digest = hashlib.sha256(json.dumps({
        "file": FILE_VERSION, "quantizer": QUANTIZER_VERSION, "format": fmt.name, "hidden": fmt.hidden,
        "inter": fmt.inter, "compute": str(fmt.compute_dtype), "keys": store.num_keys, "bytes": fmt.nbytes,
    }, sort_keys=True).encode())
    for shard in sorted(shards):
        stat = shard.stat()
        digest.update(f"{shard.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        with shard.open("rb") as f:
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
        crcs = json.loads(meta["crc32"])
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


def save_cache(path: Path, key: str, store: HostExpertStore) -> None:
    """Write the store's packed rows to ``path`` (through a temporary file, renamed when complete). A folder
    that cannot be written only costs the next load its quantization: warn and go on."""
    nbytes, keys = store.format.nbytes, store.num_keys
    crcs = [zlib.crc32(store.block(k).numpy()) for k in range(keys)]
    header = {"__metadata__": {"key": key, "format": store.format.name, "crc32": json.dumps(crcs)}}
    for k in range(keys):
        header[f"expert.{k}"] = {"dtype": "U8", "shape": [nbytes], "data_offsets": [k * nbytes, (k + 1) * nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                     # the data starts 8-byte aligned
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for k in range(keys):
                f.write(memoryview(store.block(k).numpy()))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the quantized-experts cache {path} ({err}); the next load quantizes "
                      "again (set quant_cache to a writable folder)", stacklevel=3)
