"""Stored expert formats: the bytes of one expert in each format, and how they are made and read back.

    # H = hidden, I = intermediate, G = group size, B = FP8 block size (128)
    An expert's weights are gate_up [2I, H] (rows 0..I-1 gate, I..2I-1 up) and down [H, I].

    native (float32, float16, bfloat16): one row of that dtype, [gate_up | down] flattened (no scales).
    packed formats: one row of bytes, segments in this order; the weight bytes form one run
    ([gate_up | down], as a native block), each array of scales starts 16-byte aligned:
      int8        q int8 [2I, H] | q int8 [H, I] | scales float32 [2I + H]
                  per output row, symmetric: W[r] ~= scales[r] * q[r]
      int4 (G=64), int4-g32, int4-g128
                  q uint8 [2I, H/2] | q uint8 [H, I/2]              two weights per byte along the input:
                                                                    byte j = q[2j] | q[2j+1] << 4, q in 0..15
                  scale, zero float16 [2I, ceil(H/G)] each | scale, zero float16 [H, ceil(I/G)] each
                  W[r, c] ~= (q[r, c] - zero[r, c // G]) * scale[r, c // G]   (the last group may be short)
      fp8         q uint8 (float8_e4m3fn bits) [2I, H] | [H, I]
                  scale float32 [2 * ceil(I/B), ceil(H/B)] | [ceil(H/B), ceil(I/B)]
                  W[r, c] ~= fp8(q[r, c]) * scale[block_row(r), c // B]; gate and up are blocked
                  separately (block_row(r) = (r // I) * ceil(I/B) + (r % I) // B), as FP8 checkpoints store them

"-a8" formats (int8-a8, int4-a8, int4-g128-a8) store the same bytes as their weight-only twins and
also round each matmul's input to int8 per block of 64 (act_quant.py): the CPU then multiplies integers
(int_kernels.py), and a device expert fake-quantizes its activations the same way (``forward``).

Every quantizer works row by row (FP8: B rows of gate, up or down), so each projection can be
written on its own as the checkpoint yields it. The same ``unpack`` runs on the CPU and on CUDA:
the engine dequantizes into one reused scratch and runs transformers' own ops, and the parity
reference is transformers running ``dequantized`` weights.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .act_quant import fake_quantize

from .quantize_kernels import HQQ_BETA, HQQ_BETA_GROWTH, INT4_MIN_SCALE, int4_rows, int8_rows

NATIVE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_ONLY = ("int8", "int4", "int4-g32", "int4-g128", "fp8")
# "-a8": the same stored bytes, with the activations rounded to int8 per block (act_quant.py), so that
# the CPU runs integer dot products; weight-only formats keep float activations (more accurate). fp8 has
# no integer form, and groups of 32 are narrower than an activation block.
ACT_QUANT_SUFFIX = "-a8"
ACT_QUANT = tuple(f"{name}{ACT_QUANT_SUFFIX}" for name in WEIGHT_ONLY if name not in ("fp8", "int4-g32"))
PACKED = (*WEIGHT_ONLY, *ACT_QUANT)
FORMAT_NAMES = (*NATIVE, *PACKED)
ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "int4-g64": "int4",
           "float8": "fp8", "float8_e4m3fn": "fp8", "int4-g64-a8": "int4-a8", "w8a8": "int8-a8", "w4a8": "int4-a8"}
INT4_GROUP = {"int4-g32": 32, "int4": 64, "int4-g128": 128}
FP8_BLOCK = 128
FP8_MAX = 448.0          # largest finite float8_e4m3fn
_ALIGN = 16
# per format, bumped when its quantizer's output changes: cached packed experts of that format are then rebuilt
# (version 2 of int4: least-squares refits; an "-a8" format stores its weight-only twin's bytes)
QUANTIZER_VERSIONS = {name: 2 if INT4_GROUP.get(name.removesuffix(ACT_QUANT_SUFFIX)) else 1 for name in FORMAT_NAMES}


@dataclass(frozen=True)
class Int4Fit:
    """How the int4 quantizer fits each group's (scale, zero) after min-max: ``ls_steps`` least-squares refits of
    both to the group's codes, then ``hqq_steps`` half-quadratic steps of the zero point (HQQ's sparse l_p
    fit), each step kept per group only where it lowers the squared error. The default is the setting that
    bench/quantize_speed.py measured to lower the error most per second spent."""

    ls_steps: int = 2
    hqq_steps: int = 0


INT4_FIT = Int4Fit()


def canonical_expert_format(name: str | torch.dtype) -> str:
    """'bf16', torch.bfloat16, 'int4-g64', ... -> a name of FORMAT_NAMES; ValueError if unknown."""
    key = str(name).lower().replace("torch.", "")
    key = ALIASES.get(key, key)
    if key not in FORMAT_NAMES:
        raise ValueError(f"unknown expert format {name!r}; use one of {', '.join(FORMAT_NAMES)}")
    return key


@dataclass(frozen=True)
class Segment:
    """One array inside a packed row: its dtype, shape and byte offset."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _aligned(n: int) -> int:
    return _ceil(n, _ALIGN) * _ALIGN


class ExpertFormat:
    """The stored form of every routed expert of one model (see the module docstring).

    ``name``: a FORMAT_NAMES entry; ``storage``: the weight-only format whose bytes it stores (``name`` less
    "-a8"); ``act_quant``: activations rounded per act_quant.py before each matmul; ``compute_dtype``: what the device dequantizes into (the model's
    dtype). ``row_dtype`` / ``row_numel``: the host store's and the device slots' element type and
    elements per expert; ``nbytes``: bytes per expert, scales included.
    """

    def __init__(self, name: str, hidden: int, inter: int, compute_dtype: torch.dtype):
        self.name = canonical_expert_format(name)
        self.hidden, self.inter = int(hidden), int(inter)
        self.compute_dtype = compute_dtype
        self.packed = self.name in PACKED
        self.act_quant = self.name in ACT_QUANT
        self.storage = self.name.removesuffix(ACT_QUANT_SUFFIX) if self.act_quant else self.name
        self.group = INT4_GROUP.get(self.storage, 0)
        if self.group and (hidden % 2 or inter % 2):
            raise ValueError(f"int4 experts need even hidden and intermediate sizes, got H={hidden}, I={inter}")
        self.segments = self._layout() if self.packed else {}
        if self.packed:
            end = max(s.offset + s.nbytes for s in self.segments.values())
            self.row_dtype, self.row_numel = torch.uint8, _aligned(end)
        else:
            self.row_dtype, self.row_numel = NATIVE[self.name], 3 * hidden * inter
        self.nbytes = self.row_numel * torch.empty((), dtype=self.row_dtype).element_size()
        # computing from a row needs a dequantized (or cast) copy of its weights
        self.needs_scratch = self.packed or self.row_dtype != compute_dtype

    numba = True     # the CPU runner has Numba kernels for the format (else it runs torch's matmuls)

    def at(self, layer: int) -> "ExpertFormat":
        """The format of MoE layer ``layer``'s experts: the same for every layer (GGUF files may differ)."""
        return self

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"ExpertFormat({self.name!r}, H={self.hidden}, I={self.inter}, {self.nbytes} bytes per expert)"

    def _layout(self) -> dict[str, Segment]:
        h, i = self.hidden, self.inter
        if self.storage == "int8":
            arrays = [("gate_up", torch.int8, (2 * i, h)), ("down", torch.int8, (h, i)),
                      ("scales", torch.float32, (2 * i + h,))]
        elif self.group:
            g = self.group
            arrays = [("gate_up", torch.uint8, (2 * i, h // 2)), ("down", torch.uint8, (h, i // 2)),
                      ("gate_up_scale", torch.float16, (2 * i, _ceil(h, g))),
                      ("gate_up_zero", torch.float16, (2 * i, _ceil(h, g))),
                      ("down_scale", torch.float16, (h, _ceil(i, g))), ("down_zero", torch.float16, (h, _ceil(i, g)))]
        else:
            b = FP8_BLOCK
            arrays = [("gate_up", torch.uint8, (2 * i, h)), ("down", torch.uint8, (h, i)),
                      ("gate_up_scale", torch.float32, (2 * _ceil(i, b), _ceil(h, b))),
                      ("down_scale", torch.float32, (_ceil(h, b), _ceil(i, b)))]
        segments, offset = {}, 0
        for name, dtype, shape in arrays:
            if dtype not in (torch.int8, torch.uint8):
                offset = _aligned(offset)   # byte arrays follow each other, so the weights are one run
            segments[name] = Segment(dtype, shape, offset)
            offset += segments[name].nbytes
        return segments

    # -- views ---------------------------------------------------------------------------------------------------
    def views(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of one expert's row (a host store row or a device slot), no copy."""
        if not self.packed:
            split = 2 * self.inter * self.hidden
            return {"gate_up": row[:split].view(2 * self.inter, self.hidden),
                    "down": row[split:].view(self.hidden, self.inter)}
        return {name: row[s.offset: s.offset + s.nbytes].view(s.dtype).view(s.shape)
                for name, s in self.segments.items()}

    def numpy_views(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """The same views of a numpy uint8 row (what the CPU kernels read); float16 stays float16."""
        return {name: row[start:end].view(dtype).reshape(shape) for name, start, end, dtype, shape in self._numpy_segments}

    @functools.cached_property
    def _numpy_segments(self) -> list[tuple]:
        """(name, start, end, numpy dtype, shape) of each segment, computed once (numpy_views runs per call)."""
        return [(name, s.offset, s.offset + s.nbytes, np.dtype(str(s.dtype).removeprefix("torch.")), s.shape)
                for name, s in self.segments.items()]

    # -- writing -------------------------------------------------------------------------------------------------
    def write(self, row: torch.Tensor, role: str, weight: torch.Tensor) -> None:
        """Quantize (or cast) one projection into ``row``: 'gate' / 'up' [I, H], 'gate_up' [2I, H], 'down' [H, I]."""
        if role == "gate_up":
            self.write(row, "gate", weight[: self.inter])
            self.write(row, "up", weight[self.inter:])
            return
        matrix, rows = self._rows(role)
        views = self.views(row)
        if not self.packed:
            views[matrix][rows].copy_(weight)
            return
        if self.storage == "int8":
            self._write_int8(views[matrix][rows], views["scales"][self._scale_rows(matrix, rows)], weight)
        elif self.group:
            self._write_int4(views[matrix][rows], views[f"{matrix}_scale"][rows], views[f"{matrix}_zero"][rows],
                             weight)
        else:
            q, scale = quantize_fp8(weight.float())
            self.write_fp8(row, role, q, scale)

    @staticmethod
    def _write_int8(q_out: torch.Tensor, scale_out: torch.Tensor, weight: torch.Tensor) -> None:
        """q_out int8 [R, K], scale_out float32 [R] <- weight [R, K]: Numba on the CPU, torch elsewhere."""
        if q_out.device.type == "cpu" and weight.device.type == "cpu":
            int8_rows(_stored_bits(weight), q_out.numpy(), scale_out.numpy())
            return
        q, scale = quantize_int8(weight.float())
        q_out.copy_(q)
        scale_out.copy_(scale)

    def _write_int4(self, q_out: torch.Tensor, scale_out: torch.Tensor, zero_out: torch.Tensor,
                    weight: torch.Tensor) -> None:
        """q_out uint8 [R, K/2], scale_out / zero_out float16 [R, ceil(K/G)] <- weight [R, K]."""
        if q_out.device.type == "cpu" and weight.device.type == "cpu":
            int4_rows(_stored_bits(weight), self.group, INT4_FIT.ls_steps, INT4_FIT.hqq_steps, q_out.numpy(),
                      scale_out.view(torch.int16).numpy(), zero_out.view(torch.int16).numpy())
            return
        q, scale, zero = quantize_int4(weight.float(), self.group)
        q_out.copy_(q)
        scale_out.copy_(scale)
        zero_out.copy_(zero)

    def write_fp8(self, row: torch.Tensor, role: str, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Store already-FP8 weights as they are (an FP8 checkpoint's ``weight`` and ``weight_scale_inv``,
        128x128 blocks): 1 byte per weight, no second rounding."""
        if self.storage != "fp8":
            raise ValueError(f"write_fp8 stores fp8 experts; this format is {self.name}")
        if role == "gate_up":
            split = _ceil(self.inter, FP8_BLOCK)
            self.write_fp8(row, "gate", q[: self.inter], scale[:split])
            self.write_fp8(row, "up", q[self.inter:], scale[split:])
            return
        matrix, rows = self._rows(role)
        views = self.views(row)
        views[matrix][rows] = q.view(torch.uint8)
        views[f"{matrix}_scale"][self._block_rows(role)] = scale.float()

    def write_int4(self, row: torch.Tensor, role: str, q: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor) -> None:
        """Store already-int4 weights as they are (an int4 checkpoint's codes, scales and zeros in this
        format's groups): q uint8 [R, K/2], scale and zero float16 [R, ceil(K/G)]."""
        if not self.group:
            raise ValueError(f"write_int4 stores int4 experts; this format is {self.name}")
        matrix, rows = self._rows(role) if role != "gate_up" else ("gate_up", slice(0, 2 * self.inter))
        views = self.views(row)
        for name, value in ((matrix, q), (f"{matrix}_scale", scale), (f"{matrix}_zero", zero)):
            target = views[name][rows]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"int4 {name} of shape {list(value.shape)} for a {role} projection of "
                                 f"{list(target.shape)}")
            target.copy_(value)

    def _rows(self, role: str) -> tuple[str, slice]:
        i = self.inter
        return {"gate": ("gate_up", slice(0, i)), "up": ("gate_up", slice(i, 2 * i)),
                "down": ("down", slice(0, self.hidden))}[role]

    def _scale_rows(self, matrix: str, rows: slice) -> slice:
        base = 0 if matrix == "gate_up" else 2 * self.inter
        return slice(base + rows.start, base + rows.stop)

    def _block_rows(self, role: str) -> slice:
        n = _ceil(self.inter, FP8_BLOCK)
        return {"gate": slice(0, n), "up": slice(n, 2 * n), "down": slice(0, _ceil(self.hidden, FP8_BLOCK))}[role]

    # -- reading -------------------------------------------------------------------------------------------------
    def unpack(self, row: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) in ``compute_dtype``: views of a native row, or dequantized into
        ``scratch`` (>= 3HI elements of ``compute_dtype`` on the row's device; allocated when None)."""
        views = self.views(row)
        if not self.needs_scratch:
            return views["gate_up"], views["down"]
        h, i = self.hidden, self.inter
        if scratch is None:
            scratch = torch.empty(3 * h * i, dtype=self.compute_dtype, device=row.device)
        gate_up = scratch[: 2 * i * h].view(2 * i, h)
        down = scratch[2 * i * h: 3 * i * h].view(h, i)
        for matrix, out in (("gate_up", gate_up), ("down", down)):
            self._dequantize(views, matrix, out)
        return gate_up, down

    def _dequantize(self, views: dict[str, torch.Tensor], matrix: str, out: torch.Tensor) -> None:
        """One matrix of a row into ``out`` (a native row's, cast)."""
        q = views[matrix]
        if not self.packed:
            out.copy_(q)
        elif self.storage == "int8":
            rows = self._scale_rows(matrix, slice(0, q.shape[0]))
            out.copy_(q.float() * views["scales"][rows, None])
        elif self.group:
            out.copy_(dequantize_int4(q, views[f"{matrix}_scale"], views[f"{matrix}_zero"], self.group))
        elif matrix == "down":
            out.copy_(dequantize_fp8(q, views["down_scale"]))
        else:                                   # gate and up are blocked separately
            scale, half, i = views["gate_up_scale"], views["gate_up_scale"].shape[0] // 2, self.inter
            out[:i].copy_(dequantize_fp8(q[:i], scale[:half]))
            out[i:].copy_(dequantize_fp8(q[i:], scale[half:]))

    # -- the arithmetic ------------------------------------------------------------------------------------------
    def round_activations(self, x: torch.Tensor) -> torch.Tensor:
        """A projection's input as this format computes with it: rounded per act_quant.py for "-a8" formats,
        else unchanged."""
        return fake_quantize(x) if self.act_quant else x

    def forward(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn) -> torch.Tensor:
        """One expert on x [t, H] with (dequantized) gate_up [2I, H] and down [H, I]: transformers' ops, each
        matmul's input rounded as the format rounds it (how a device expert runs; the CPU kernels compute the
        same function)."""
        return expert_forward(x, gate_up, down, act_fn, self.round_activations)

    def dequantized(self, weight: torch.Tensor, role: str) -> torch.Tensor:
        """What the engine computes with for a projection written as ``weight``: dequant(quant(weight)) in
        ``compute_dtype`` (the parity reference's weights)."""
        row = torch.zeros(self.row_numel, dtype=self.row_dtype, device=weight.device)
        self.write(row, role, weight)
        gate_up, down = self.unpack(row)
        matrix, rows = self._rows(role) if role != "gate_up" else ("gate_up", slice(0, 2 * self.inter))
        return (gate_up if matrix == "gate_up" else down)[rows].clone()


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn, rounding=None,
                   columns=None) -> torch.Tensor:
    """x [t, H] -> [t, H] = down @ (act(gate @ x) * (up @ x)) with transformers' ops; ``rounding``
    (e.g. ExpertFormat.round_activations) is applied to each matmul's input, then ``columns`` (the column
    order of matrices stored with permuted columns, e.g. deinterleaved int4)."""
    rounding = rounding or (lambda v: v)
    columns = columns or (lambda v: v)
    gate, up = F.linear(columns(rounding(x)), gate_up).chunk(2, dim=-1)               # [t, I] each
    return F.linear(columns(rounding(act_fn(gate) * up)), down)                        # [t, H]


# -- the quantizers (torch, any device) ------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, K] float32 -> (q int8 [R, K], scale float32 [R]): symmetric per row, scale = max|w| / 127."""
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8), scale


def _stored_bits(weight: torch.Tensor) -> np.ndarray:
    """A CPU weight [R, K] as the Numba quantizers read it (no copy when contiguous): float32, bf16 bits as
    uint16, fp16 bits as int16; any other dtype widened to float32."""
    weight = weight.detach().contiguous()
    if weight.dtype == torch.bfloat16:
        return weight.view(torch.int16).numpy().view(np.uint16)
    if weight.dtype == torch.float16:
        return weight.view(torch.int16).numpy()
    return weight.float().numpy()


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[R, K] -> [R, ceil(K/G), G] (the last group padded by repeating its last column)."""
    rows, cols = w.shape
    pad = _ceil(cols, group) * group - cols
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.view(rows, -1, group)


def _int4_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.round(wg / scale[..., None] + zero[..., None]).clamp_(0, 15)


def _int4_fit(wg: torch.Tensor, fit: Int4Fit) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (scale, zero), both rounded to float16 as stored: min-max, then ``fit``'s steps (Int4Fit),
    each kept per group where it lowers the squared error. (quantize_kernels.int4_rows is the same fit in
    Numba.)"""
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp_min(INT4_MIN_SCALE).half().float()
    zero = (-lo / scale).half().float()
    err = _int4_error(wg, scale, zero)
    for _ in range(fit.ls_steps):
        new_scale, new_zero = _least_squares(wg, scale, zero)
        new_err = _int4_error(wg, new_scale, new_zero)
        better = new_err < err
        scale, zero = torch.where(better, new_scale, scale), torch.where(better, new_zero, zero)
        err = torch.where(better, new_err, err)
    beta = HQQ_BETA
    for _ in range(fit.hqq_steps):
        new_zero = _hqq_zero(wg / scale[..., None], scale, zero, beta)
        new_err = _int4_error(wg, scale, new_zero)
        better = new_err < err
        zero, err = torch.where(better, new_zero, zero), torch.where(better, new_err, err)
        beta *= HQQ_BETA_GROWTH
    return scale.half(), zero.half()


def _least_squares(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares line w ~ scale * (code - zero) through each group's current codes, float16-rounded;
    (scale, zero) unchanged where the codes are all equal or the slope is below the floor."""
    q = _int4_codes(wg, scale, zero)                                        # [R, NG, G]
    n = wg.shape[-1]
    sq, sqq, sw, sqw = q.sum(-1), q.square().sum(-1), wg.sum(-1), (q * wg).sum(-1)
    det = n * sqq - sq * sq
    slope = (n * sqw - sq * sw) / torch.where(det > 0, det, torch.ones_like(det))
    ok = (det > 0) & (slope >= INT4_MIN_SCALE)
    new_scale = torch.where(ok, slope, scale).half().float()
    new_zero = (-((sw - slope * sq) / n) / new_scale).half().float()
    return new_scale, torch.where(ok, new_zero, zero)


def _hqq_zero(ws: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, beta: float) -> torch.Tensor:
    """One half-quadratic step of each group's zero point (sparse l_p error, p = 0.7), float16-rounded. In units
    of the scale (ws = w / scale): codes q = round(ws + zero), error u = ws - q + zero."""
    s = scale[..., None]
    q = (ws + zero[..., None]).round_().clamp_(0, 15)
    u = ws - q
    u += zero[..., None]
    mag = u.abs()
    shrunk = torch.relu_(mag - (mag * s).clamp_min_(1e-8).pow_(-0.3) / (beta * s)).mul_(torch.sign(u))
    return (q - ws + shrunk).mean(dim=-1).half().float()


def _int4_error(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    q = _int4_codes(wg, scale, zero)
    return ((q - zero[..., None]) * scale[..., None] - wg).square().sum(dim=-1)


def quantize_int4(w: torch.Tensor, group: int, fit: Int4Fit = INT4_FIT) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """[R, K] float32 (K even) -> (packed uint8 [R, K/2], scale float16 [R, ceil(K/G)], zero float16 [same])."""
    rows, cols = w.shape
    wg = _groups(w, group)
    scale, zero = _int4_fit(wg, fit)
    q = _int4_codes(wg, scale.float(), zero.float()).to(torch.uint8).view(rows, -1)[:, :cols]   # [R, K]
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """packed uint8 [R, K/2], scale/zero float16 [R, ceil(K/G)] -> float32 [R, K]."""
    rows, half = packed.shape
    q = torch.stack([packed & 15, packed >> 4], dim=-1).view(rows, 2 * half).float()     # [R, K]
    index = torch.arange(2 * half, device=packed.device) // group                          # [K] group of each column
    return (q - zero.float()[:, index]) * scale.float()[:, index]


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """[..., ceil(R/BR), ceil(K/BK)] per-block factors -> [..., R, K] per weight (the last blocks partial)."""
    scale = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :]
    return scale.repeat_interleave(block[1], dim=-1)[..., :cols]


def quantize_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, K] float32 -> (q float8_e4m3fn [R, K], scale float32 [ceil(R/B), ceil(K/B)]): per B x B block,
    scale = max|w| / 448 (what FP8 checkpoints call weight_scale_inv)."""
    rows, cols = w.shape
    nr, nc = _ceil(rows, block), _ceil(cols, block)
    padded = torch.zeros(nr * block, nc * block, device=w.device)
    padded[:rows, :cols] = w.abs()
    scale = padded.view(nr, block, nc, block).amax(dim=(1, 3)) / FP8_MAX                    # [ceil(R/B), ceil(K/B)]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / _expand_blocks(safe, rows, cols, (block, block))).to(torch.float8_e4m3fn), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: int | tuple[int, int] = FP8_BLOCK) -> torch.Tensor:
    """q float8_e4m3fn (or its uint8 bits) [..., R, K], scale [..., ceil(R/BR), ceil(K/BK)] -> float32
    [..., R, K]; ``block``: B, or (BR, BK) as a checkpoint's weight_block_size gives it."""
    rows, cols = q.shape[-2:]
    block = (block, block) if isinstance(block, int) else tuple(block)
    return q.view(torch.float8_e4m3fn).float() * _expand_blocks(scale.float(), rows, cols, block)
