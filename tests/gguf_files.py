"""GGUF files derived from the llama.cpp-made fixtures with the gguf package's writer: two MoE layers
whose experts differ in type, a split set, a dense model, a type the expert formats do not keep, a
truncated file. Tensor bytes are copied as llama.cpp wrote them unless a case says otherwise."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quantize

FIXTURES = Path(__file__).parent / "fixtures" / "gguf"
_SKIP_FIELDS = ("GGUF.", "general.alignment", "split.")


def _copy_fields(reader: GGUFReader, writer: GGUFWriter, changes: dict) -> None:
    """Every metadata field of ``reader`` into ``writer`` ({key: new value, or None to drop} applied)."""
    for key, field in reader.fields.items():
        if key.startswith(_SKIP_FIELDS) or key == "general.architecture":
            continue
        if key in changes:
            if changes[key] is None:
                continue
            value = changes[key]
        else:
            value = field.contents()
        kind = field.types[0]
        sub = field.types[1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, kind, sub)


def _architecture(reader: GGUFReader) -> str:
    return reader.fields["general.architecture"].contents()


def rewrite(src: Path, out: Path, tensors, changes: dict | None = None, split_max_tensors: int = 0) -> Path:
    """``src``'s metadata (with ``changes``) and ``tensors`` [(name, numpy array as the reader gives it,
    GGMLQuantizationType)] written to ``out`` (a split set when split_max_tensors is set)."""
    reader = GGUFReader(src)
    writer = GGUFWriter(out, _architecture(reader), split_max_tensors=split_max_tensors)
    _copy_fields(reader, writer, changes or {})
    for name, data, kind in tensors:
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def stored(path: Path):
    """[(name, data, type)] of a file, as rewrite takes them."""
    return [(t.name, np.array(t.data), t.tensor_type) for t in GGUFReader(path).tensors]


def stack_layers(first: Path, second: Path, out: Path) -> Path:
    """A two-layer model: ``first``'s file with its block 0 repeated as block 1, the repeat's routed
    experts taken from ``second`` (the same weights quantized to other types by llama.cpp)."""
    block = re.compile(r"^blk\.0\.")
    experts_of_second = {n: (d, k) for n, d, k in stored(second) if "_exps." in n}
    tensors = []
    for name, data, kind in stored(first):
        tensors.append((name, data, kind))
        if block.match(name):
            if name in experts_of_second:
                data, kind = experts_of_second[name]
            tensors.append((block.sub("blk.1.", name), data, kind))
    arch = _architecture(GGUFReader(first))
    return rewrite(first, out, tensors, {f"{arch}.block_count": 2})


def dense_model(src: Path, out: Path) -> Path:
    """``src`` without its experts: the metadata of a dense model, the dense FFN in their place."""
    arch = _architecture(GGUFReader(src))
    tensors = []
    for name, data, kind in stored(src):
        if "_exps." in name:
            tensors.append((name.replace("_exps.", "."), np.array(data[0]), kind))
        elif "ffn_gate_inp" not in name:
            tensors.append((name, data, kind))
    return rewrite(src, out, tensors, {f"{arch}.expert_count": None, f"{arch}.expert_used_count": None})


def requantized_experts(src: Path, out: Path, kind: GGMLQuantizationType) -> Path:
    """``src`` with its routed experts dequantized and quantized again to ``kind`` by the gguf package."""
    from gguf import dequantize

    tensors = []
    for name, data, old in stored(src):
        if "_exps." in name:
            data, old = quantize(dequantize(data, old), kind), kind
        tensors.append((name, data, old))
    return rewrite(src, out, tensors)


def random_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes of ``kind``'s blocks for [rows, cols] with finite float16 scales (the gguf package has
    no quantizer for the K-quants)."""
    from moe_offload.cpu_kernels.ggml_blocks import TYPE_BY_NAME

    t = TYPE_BY_NAME[kind]
    if t.block == 1:
        values = rng.normal(size=rows * cols).astype(np.float32)
        if kind == "BF16":
            return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return values.astype({"F32": np.float32, "F16": np.float16}[kind]).view(np.uint8)
    raw = rng.integers(0, 256, rows * t.row_bytes(cols), dtype=np.uint8)
    blocks = raw.reshape(-1, t.nbytes)
    for at in {"Q8_0": [0], "Q4_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[kind]:
        halves = (rng.normal(size=blocks.shape[0]) * 0.002).astype(np.float16)
        blocks[:, at: at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return raw


def random_expert_blocks(src: Path, out: Path, kinds: dict[str, str], seed: int = 0) -> Path:
    """``src`` with random routed-expert blocks of ``kinds`` ({'gate': 'Q4_K', 'up': ..., 'down': ...})."""
    rng = np.random.default_rng(seed)
    tensors = []
    for name, data, kind in stored(src):
        m = re.search(r"ffn_(gate|up|down)_exps", name)
        if m:
            experts, rows = data.shape[:2]
            cols = _columns(src, name)
            kind = GGMLQuantizationType[kinds[m[1]]]
            data = random_blocks(kinds[m[1]], experts * rows, cols, rng).reshape(experts, rows, -1)
        tensors.append((name, data, kind))
    return rewrite(src, out, tensors)


def _columns(src: Path, name: str) -> int:
    """A tensor's row length (its first GGUF dimension)."""
    return int(next(t for t in GGUFReader(src).tensors if t.name == name).shape[0])


def truncated(src: Path, out: Path, keep: float = 0.9) -> Path:
    data = src.read_bytes()
    out.write_bytes(data[: int(len(data) * keep)])
    return out
