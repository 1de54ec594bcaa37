"""Routed experts kept in their GGUF file's blocks, byte for byte (an expert format beside packed.py's).

    # H = hidden, I = intermediate; gate, up [I, H] and down [H, I], blocks along each matrix's input
    row: gate bytes | up bytes | down bytes, each projection's bytes exactly as the file stores that expert's
         slice of blk.L.ffn_{gate,up,down}_exps (llama.cpp stacks a layer's experts: [E, I, H] / [E, H, I]),
         then zero padding to the longest layer's row (llama.cpp picks types per layer: a Q4_K_M file keeps
         some layers' down projections in Q6_K), rounded up to 16 bytes.

Each projection has its own GGML type (ggml_blocks.py: Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, or F32/F16/BF16 as
plain values), and each MoE layer its (gate, up, down) types; ``at(layer)`` is that layer's format (one
row size for the whole model, so host rows and device slots stay interchangeable).

Arithmetic (one per format, wherever the expert runs): weight-only. The weights are dequantized exactly
as the ``gguf`` package's ``dequantize`` does (float32), then the expert runs on unquantized activations:
on the device, dequantized into the engine's reused scratch in the model's dtype and run with
transformers' own ops; on the CPU, dequantized into the runner's float32 scratch by ``ggml_dequant``'s
Numba kernels (bit for bit the torch ops the device runs) and run with torch's matmuls (the
dequantize-then-matmul backend). llama.cpp's own dot products also round the activations to 8 bits;
this format does not, on either path, so it equals transformers running the file's dequantized weights.
"""

from __future__ import annotations

import numpy as np
import torch

from .ggml_blocks import GGMLType, dequantize
from .ggml_dequant import dequantize_cpu, gguf_ffn
from .packed import ExpertFormat, _aligned

PROJECTIONS = ("gate", "up", "down")


class GGUFExpertFormat(ExpertFormat):
    """Experts of a GGUF file; ``layer_types[l]`` = (gate, up, down) GGMLType of MoE layer l.

    ``row_bytes``: the row size to use (default: the longest layer's, aligned), so that the per-layer
    formats ``at(l)`` share it."""

    def __init__(self, layer_types, hidden: int, inter: int, compute_dtype: torch.dtype,
                 row_bytes: int | None = None):
        self.name = "gguf"
        self.hidden, self.inter = int(hidden), int(inter)
        self.compute_dtype = compute_dtype
        self.layer_types: tuple[tuple[GGMLType, GGMLType, GGMLType], ...] = tuple(tuple(t) for t in layer_types)
        self.packed, self.group, self.segments = True, 0, {}
        self.act_quant, self.storage = False, "gguf"     # weight-only: float activations on every path
        self.sizes = [self._sizes(types) for types in self.layer_types]    # per layer: (gate, up, down) bytes
        self.row_dtype = torch.uint8
        self.row_numel = row_bytes or _aligned(max(sum(s) for s in self.sizes))
        self.nbytes = self.row_numel
        self.needs_scratch = True
        self.numba = False
        self._layers: dict[int, GGUFExpertFormat] = {}     # MoE layer -> its format (``at``)

    def _sizes(self, types) -> tuple[int, int, int]:
        gate, up, down = types
        return (self.inter * gate.row_bytes(self.hidden), self.inter * up.row_bytes(self.hidden),
                self.hidden * down.row_bytes(self.inter))

    def __repr__(self) -> str:
        return f"GGUFExpertFormat({self.describe()}, H={self.hidden}, I={self.inter}, {self.nbytes} bytes per expert)"

    def describe(self) -> str:
        """The types, each combination's bytes per expert as stored and its MoE layers, e.g. 'GGUF Q4_K
        gate/up, Q4_K down: 1,234 bytes (MoE layers 0, 2); Q4_K gate/up, Q6_K down: 1,456 bytes (MoE
        layers 1, 3)'."""
        by_types: dict[tuple, list[int]] = {}
        for layer, types in enumerate(self.layer_types):
            by_types.setdefault(tuple(t.name for t in types), []).append(layer)
        parts = []
        for (gate, up, down), layers in by_types.items():
            text = gate if gate == up == down else f"{gate} gate/up, {down} down" if gate == up else \
                f"{gate} gate, {up} up, {down} down"
            text += f": {self.layer_bytes(layers[0]):,} bytes"
            parts.append(text + (f" (MoE layers {', '.join(map(str, layers))})" if len(by_types) > 1 else ""))
        return "GGUF " + "; ".join(parts)

    @property
    def type_names(self) -> list[str]:
        """The GGML types the experts use, each once."""
        return sorted({t.name for types in self.layer_types for t in types})

    def layer_bytes(self, layer: int) -> int:
        """Bytes of an expert of MoE layer ``layer`` as the file stores them (without the row's padding)."""
        return sum(self.sizes[layer])

    def at(self, layer: int) -> "GGUFExpertFormat":
        """The format of MoE layer ``layer``'s experts (same row size); made once per layer (the engine asks
        on every experts call)."""
        if len(self.layer_types) == 1:
            return self
        fmt = self._layers.get(layer)
        if fmt is None:
            fmt = self._layers[layer] = GGUFExpertFormat([self.layer_types[layer]], self.hidden, self.inter,
                                                         self.compute_dtype, self.row_numel)
        return fmt

    def offsets(self, layer: int = 0) -> dict[str, int]:
        """Byte offset of each projection in a row of MoE layer ``layer``."""
        gate, up, _ = self.sizes[layer]
        return {"gate": 0, "up": gate, "down": gate + up}

    def _single(self) -> tuple[GGMLType, GGMLType, GGMLType]:
        if len({tuple(t) for t in self.layer_types}) != 1:
            raise ValueError("this GGUF expert format differs between layers; use at(layer)")
        return self.layer_types[0]

    def views(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 views of one row's gate, up and down bytes."""
        self._single()
        where, sizes = self.offsets(), self.sizes[0]
        return {p: row[where[p]: where[p] + n] for p, n in zip(PROJECTIONS, sizes)}

    @property
    def kernel_key(self) -> str:
        """What the CPU runner times this format's backends under: e.g. 'gguf Q4_K,Q4_K,Q6_K'."""
        return "gguf " + ",".join(t.name for t in self._single())

    def numpy_views(self, row):
        raise ValueError("GGUF expert rows run through ffn_numba (the fused kernels) or unpack (torch)")

    def ffn_numba(self, x: np.ndarray, row: np.ndarray, code: int, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """out [T, H] = the expert of ``row`` (uint8 numpy, this format) on x [T, H], each block decoded as it is
        multiplied (``ggml_dequant.gguf_ffn``); scratch float32 >= 2 T I floats."""
        where, sizes = self.offsets(), self.sizes[0]
        rows = {"gate": self.inter, "up": self.inter, "down": self.hidden}
        mats = [(row[where[p]: where[p] + n], t, rows[p]) for p, n, t in zip(PROJECTIONS, sizes, self._single())]
        return gguf_ffn(x, *mats, code, out, scratch)

    def write(self, row: torch.Tensor, role: str, weight: torch.Tensor) -> None:
        raise ValueError("a GGUF expert format stores the file's bytes (write_bytes); it does not quantize")

    def write_fp8(self, row, role, q, scale) -> None:
        raise ValueError("a GGUF expert format stores the file's bytes (write_bytes)")

    def write_bytes(self, row: torch.Tensor, role: str, data: torch.Tensor) -> None:
        """Store one projection ('gate', 'up' or 'down') as the file's bytes (uint8, as many as the type needs)."""
        view = self.views(row)[role]
        if data.numel() != view.numel():
            raise ValueError(f"{role}: {data.numel()} bytes, the {self._single()[PROJECTIONS.index(role)].name} "
                             f"format needs {view.numel()}")
        view.copy_(data.reshape(-1))

    def unpack(self, row: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) dequantized into ``scratch`` (>= 3HI elements; its dtype is the
        arithmetic's: the model's on the device, float32 on the CPU runner)."""
        gate_t, up_t, down_t = self._single()
        views = self.views(row)
        h, i = self.hidden, self.inter
        if scratch is None:
            scratch = torch.empty(3 * h * i, dtype=self.compute_dtype, device=row.device)
        gate_up = scratch[: 2 * i * h].view(2 * i, h)
        down = scratch[2 * i * h: 3 * i * h].view(h, i)
        if row.device.type == "cpu" and scratch.dtype == torch.float32:
            dequantize_cpu(views["gate"], gate_t, i, h, out=gate_up[:i])       # Numba, straight into the scratch
            dequantize_cpu(views["up"], up_t, i, h, out=gate_up[i:])
            dequantize_cpu(views["down"], down_t, h, i, out=down)
            return gate_up, down
        gate_up[:i].copy_(dequantize(views["gate"], gate_t, i, h))
        gate_up[i:].copy_(dequantize(views["up"], up_t, i, h))
        down.copy_(dequantize(views["down"], down_t, h, i))
        return gate_up, down

    def dequantized(self, weight: torch.Tensor, role: str) -> torch.Tensor:
        raise ValueError("GGUF experts are dequantized from the file's bytes (unpack), not from float weights")
