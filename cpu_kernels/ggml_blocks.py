"""GGML's weight types as llama.cpp writes them in GGUF files, and their dequantization in torch ops.

    # R = rows, K = columns (the input dimension: blocks run along it), B = values per block
    A matrix of type t is R rows of K / B blocks each; a block is ``nbytes`` bytes:
      F32, F16, BF16   one value per element (B = 1)
      Q8_0  (B = 32)   d float16 | q int8 [32]                          w = d * q
      Q4_0  (B = 32)   d float16 | qs uint8 [16]                        w = d * (q - 8); q of value j < 16 is
                                                                        qs[j] & 15, of value j >= 16 qs[j-16] >> 4
      Q4_K  (B = 256)  d, dmin float16 | scales uint8 [12] | qs uint8 [128]
                       eight sub-blocks of 32 with a 6-bit scale sc and min m each (packed in the 12 bytes);
                       w = (d * sc) * q - dmin * m, q the 4-bit code (two 32-value sub-blocks per 32 bytes:
                       low nibbles first, then high nibbles)
      Q5_K  (B = 256)  d, dmin float16 | scales uint8 [12] | qh uint8 [32] | qs uint8 [128]
                       as Q4_K with a fifth bit per value from qh (bit s of qh[j] for sub-block s)
      Q6_K  (B = 256)  ql uint8 [128] | qh uint8 [64] | scales int8 [16] | d float16
                       sixteen sub-blocks of 16 with an int8 scale each; w = (d * sc) * (q - 32), q 6 bits

``dequantize`` gives float32 values equal, bit for bit, to the ``gguf`` package's
``gguf.quants.dequantize`` (the same float32 operations in the same order), on any torch device: the
engine runs it into its reused scratch on the GPU, the CPU runner into its float32 scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type: its id in GGUF files, values per block and bytes per block."""

    name: str
    type_id: int
    block: int
    nbytes: int

    def row_bytes(self, columns: int) -> int:
        """Bytes of one row of ``columns`` values (a whole number of blocks)."""
        if columns % self.block:
            raise ValueError(f"{self.name} rows hold whole blocks of {self.block} values, got {columns} columns")
        return columns // self.block * self.nbytes


QK_K = 256
# The types the engine reads (ids and block sizes from GGML's type table, ggml.h).
GGML_TYPES = {t.type_id: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("BF16", 30, 1, 2),
    GGMLType("Q8_0", 8, 32, 34), GGMLType("Q4_0", 2, 32, 18),
    GGMLType("Q4_K", 12, QK_K, 144), GGMLType("Q5_K", 13, QK_K, 176), GGMLType("Q6_K", 14, QK_K, 210),
)}
TYPE_BY_NAME = {t.name: t for t in GGML_TYPES.values()}
PLAIN = ("F32", "F16", "BF16")


def _half(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 2] -> float32 [N, 1] (little-endian float16)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """uint8 [N, groups * width] -> [N, groups, 2, width]: each group's low nibbles, then its high nibbles."""
    qs = qs.reshape(qs.shape[0], groups, 1, width)
    return torch.cat([qs & 15, qs >> 4], dim=2)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K packed 6-bit scales uint8 [N, 12] -> (sc, m) float32 [N, 8]."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _half(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 1, 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return _half(b[:, :2]) * q.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_half(b[:, 0:2]) * sc).reshape(n, 8, 1)                          # [N, 8, 1]
    dm = (_half(b[:, 2:4]) * mn).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 4, 32).reshape(n, 8, 32).float()               # [N, 8 sub-blocks, 32]
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_half(b[:, 0:2]) * sc).reshape(n, 8, 1)
    dm = (_half(b[:, 2:4]) * mn).reshape(n, 8, 1)
    low = _nibbles(b[:, 48:], 4, 32).reshape(n, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
    high = (b[:, 16:48].reshape(n, 1, 32) >> shifts) & 1                   # [N, 8, 32] bit s for sub-block s
    return (d * (low | (high << 4)).float() - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()          # [N, 16]
    d = (_half(b[:, 208:210]) * scales).reshape(n, 16, 1)
    low = _nibbles(b[:, :128], 2, 64).reshape(n, 8, 32)                    # per half: 64 low nibbles, 64 high
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


_BLOCK_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(data: torch.Tensor, ggml_type: GGMLType, rows: int, columns: int) -> torch.Tensor:
    """uint8 [rows * row_bytes] (one matrix's bytes as the file stores them) -> float32 [rows, columns]."""
    if ggml_type.name == "F32":
        return data.view(torch.float32).view(rows, columns)
    if ggml_type.name == "F16":
        return data.view(torch.float16).view(rows, columns).float()
    if ggml_type.name == "BF16":
        return data.view(torch.bfloat16).view(rows, columns).float()
    blocks = data.view(-1, ggml_type.nbytes)                               # [R * K / B, nbytes]
    return _BLOCK_DEQUANT[ggml_type.name](blocks).view(rows, columns)
