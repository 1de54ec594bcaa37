"""Int4 checkpoints: GPTQ, AWQ (GEMM packing) and compressed-tensors pack-quantized (w4a16).

Each quantized linear ``P`` (a module prefix such as ``model.layers.0.mlp.experts.3.gate_proj``) stores a
weight W [N, K] (N outputs, K inputs) as 4-bit codes q, one scale s and one integer zero point z per group
of G input columns (or per output row: channel strategy, G = K), and the real weight is

    W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]        (the last group may be short)

which is the project's int4 format's formula (cpu_kernels/packed.py); only the packing differs:

  gptq   P.qweight int32 [K/8, N]   eight codes per word along K, code j at bits 4j
         P.qzeros  int32 [ceil(K/G), N/8]  eight zeros per word along N; checkpoint_format 'gptq' (v1)
                   stores z - 1 per nibble, undone by adding 0x11111111 to each word (modulo 2^32)
         P.scales  float16 [ceil(K/G), N]; P.g_idx int32 [K] (must be k // G: act-order is refused)
  awq    P.qweight int32 [K, N/8]   eight codes per word along N, in the order 0 2 4 6 1 3 5 7
         P.qzeros  int32 [ceil(K/G), N/8] (same order, z itself); P.scales float16 [ceil(K/G), N]
  compressed-tensors (format 'pack-quantized')
         P.weight_packed int32 [N, ceil(K/8)]  eight codes per word along K, code j at bits 4j, each code
                   stored as signed value + 8 (so the stored nibble is q and the signed zero is z - 8)
         P.weight_scale [N, ceil(K/G)] (channel: [N, 1]); P.weight_zero_point int32 [ceil(N/8), ceil(K/G)]
                   (asymmetric only; nibbles along N, signed + 8: z itself; symmetric: z = 8)
         P.weight_shape int [2] = (N, K)

Nothing is re-quantized: the codes and zeros are integers repacked into the project's layout, and the
scales are kept as they are (float16; a bfloat16 or float32 scale that float16 cannot hold exactly is
refused by name when the experts are stored in an int4 format).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..cpu_kernels.packed import INT4_GROUP, dequantize_int4
from ..errors import MoEOffloadError

METHODS = ("gptq", "awq", "compressed-tensors")
STORE_GROUPS = sorted(INT4_GROUP.values(), reverse=True)      # the project's int4 groups, largest first
_AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]                  # AWQ's packed slot of each of 8 columns
_GPTQ_V1_OFFSET = 0x11111111                                   # v1 qzeros: z - 1 per nibble, borrows included
_SCALE_DTYPES = ("F16", "BF16", "F32")
_INT_DTYPES = ("I32", "I64")
_SUFFIXES = {"gptq": ("qweight", "qzeros", "scales", "g_idx"),
             "awq": ("qweight", "qzeros", "scales"),
             "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                                    "weight_g_idx")}
SUPPORTED = ("GPTQ (quant_method 'gptq', bits 4, desc_act false), AWQ (quant_method 'awq', bits 4, version "
             "'gemm', zero_point true) and compressed-tensors (format 'pack-quantized', 4-bit int weights, "
             "group or channel strategy, no activation quantization), groups of a multiple of 32 columns")


@dataclass(frozen=True)
class Int4Checkpoint:
    """A GPTQ / AWQ / compressed-tensors int4 checkpoint's format (see the module docstring)."""

    method: str                  # one of METHODS
    group: int | None            # input columns per scale; None: one scale per output row (channel)
    symmetric: bool = False      # compressed-tensors without zero points (z = 8)
    gptq_v1: bool = False        # GPTQ checkpoint_format 'gptq': qzeros hold z - 1

    def describe(self) -> str:
        groups = "per output channel" if self.group is None else f"groups of {self.group}"
        zeros = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.method} int4, {groups}, {zeros}"

    @property
    def expert_format(self) -> str:
        """The project's int4 format that holds these weights exactly: the largest of its groups that divides
        the checkpoint's (each of its groups then lies inside one checkpoint group and repeats its scale)."""
        if self.group is None:
            return _store_format(STORE_GROUPS[0])
        return _store_format(next(g for g in STORE_GROUPS if self.group % g == 0))

    def fits(self, store_group: int) -> bool:
        """Whether an int4 store with groups of ``store_group`` holds these weights exactly."""
        return self.group is None or self.group % store_group == 0

    @property
    def suffixes(self) -> tuple[str, ...]:
        return _SUFFIXES[self.method]


def _store_format(group: int) -> str:
    return next(name for name, g in INT4_GROUP.items() if g == group)


class StoredInt4(NamedTuple):
    """One projection in the project's int4 layout: what ExpertFormat.write_int4 stores."""

    q: torch.Tensor       # uint8 [N, K/2], byte j = q[2j] | q[2j+1] << 4
    scale: torch.Tensor   # float16 [N, ceil(K/S)]
    zero: torch.Tensor    # float16 [N, ceil(K/S)]


class Int4Weight(NamedTuple):
    """An int4 weight as the checkpoint defines it, codes repacked along K (the project's byte order)."""

    q: torch.Tensor       # uint8 [N, K/2], byte j = q[2j] | q[2j+1] << 4
    scale: torch.Tensor   # [N, ceil(K/G)] in the checkpoint's scale dtype
    zero: torch.Tensor    # uint8 [N, ceil(K/G)], integer zero points 0..15
    group: int            # G (channel: K)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: (q - z) * s, exact (a 5-bit integer times a scale of at most 24 bits)."""
        return dequantize_int4(self.q, self.scale, self.zero, self.group)

    def regrouped(self, group: int) -> StoredInt4:
        """The same weights with one (scale, zero) per ``group`` columns (``group`` divides G): each of the
        checkpoint's repeated. ValueError when a scale is not exactly a float16."""
        cols = 2 * self.q.shape[1]
        if self.group % group and self.group < cols:
            raise ValueError(f"groups of {self.group} columns do not split into int4 groups of {group}")
        index = torch.arange(math.ceil(cols / group)) * group // self.group    # [ceil(K/S)] checkpoint group
        scale = self.scale[:, index]
        half = scale.half()
        if not torch.equal(half.to(scale.dtype), scale):
            raise ValueError(f"its {scale.dtype} scales are not all exactly float16 values")
        return StoredInt4(self.q, half, self.zero[:, index].half())


# -- config.json ------------------------------------------------------------------------------------------------
def int4_checkpoint_format(qc: dict, where) -> Int4Checkpoint:
    """The Int4Checkpoint ``quantization_config`` declares; MoEOffloadError naming the field it cannot read."""
    method = str(qc.get("quant_method")).lower()

    def refuse(field: str, why: str) -> MoEOffloadError:
        return MoEOffloadError(f"{where}: quantization_config {field} {why}; moe-offload reads {SUPPORTED}; use "
                               "an unquantized (bf16/fp16/fp32) release of the model, or one of those formats")

    if method == "compressed-tensors":
        return _compressed_tensors_format(qc, refuse)
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise refuse("bits", f"= {bits!r} is not read (only 4-bit {method} checkpoints are)")
    group = _group(qc.get("group_size", qc.get("q_group_size")), "group_size", refuse)
    if method == "awq":
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise refuse("version", f"= {qc.get('version')!r} is not read (only AWQ's GEMM packing is)")
        if qc.get("zero_point", True) is not True:
            raise refuse("zero_point", f"= {qc.get('zero_point')!r} is not read (AWQ GEMM checkpoints carry zeros)")
        return Int4Checkpoint("awq", group)
    if qc.get("dynamic"):
        raise refuse("dynamic", "is set (per-module bits or group sizes) and is not read")
    if qc.get("desc_act"):
        raise refuse("desc_act", "= true (act-order: a column permutation, g_idx) is not read; use a desc_act "
                                 "false release")
    packing = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if packing not in ("gptq", "gptq_v2"):
        raise refuse("checkpoint_format", f"= {packing!r} is not read (only 'gptq' and 'gptq_v2' are)")
    if str(qc.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise refuse("pack_dtype", f"= {qc.get('pack_dtype')!r} is not read (only int32 words are)")
    return Int4Checkpoint("gptq", group, gptq_v1=packing == "gptq")


def _group(value, field: str, refuse) -> int | None:
    """A group size: a positive multiple of 32, or -1 / None for one group per output row."""
    if value in (-1, None):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % STORE_GROUPS[-1]:
        raise refuse(field, f"= {value!r} is not read (groups of a multiple of {STORE_GROUPS[-1]} columns, or -1)")
    return value


def _compressed_tensors_format(qc: dict, refuse) -> Int4Checkpoint:
    """compressed-tensors: every config group's weights must be the same pack-quantized int4 scheme."""
    if qc.get("transform_config"):
        raise refuse("transform_config", "is set (rotated weights) and is not read")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise refuse("quantization_status", f"= {status!r} is not read (only 'compressed' checkpoints are)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise refuse("config_groups", "is missing or empty")
    schemes = set()
    for name, scheme in groups.items():
        if not isinstance(scheme, dict) or not isinstance(scheme.get("weights"), dict):
            raise refuse(f"config_groups.{name}.weights", "is missing")
        fmt = scheme.get("format") or qc.get("format")
        if fmt != "pack-quantized":
            raise refuse(f"config_groups.{name}.format", f"= {fmt!r} is not read (only 'pack-quantized' is)")
        for field in ("input_activations", "output_activations"):
            if scheme.get(field):
                raise refuse(f"config_groups.{name}.{field}", "is set (activation quantization) and is not read; "
                                                            "only weight-only w4a16 schemes are")
        schemes.add(_ct_weights(scheme["weights"], f"config_groups.{name}.weights", refuse))
    if len(schemes) > 1:
        raise refuse("config_groups", f"mix weight schemes {sorted(schemes, key=str)} and is not read")
    group, symmetric = schemes.pop()
    return Int4Checkpoint("compressed-tensors", group, symmetric=symmetric)


def _ct_weights(weights: dict, field: str, refuse) -> tuple[int | None, bool]:
    """(group or None for channel, symmetric) of one compressed-tensors weight scheme."""
    if weights.get("num_bits") != 4:
        raise refuse(f"{field}.num_bits", f"= {weights.get('num_bits')!r} is not read (only 4 is)")
    if weights.get("type", "int") != "int":
        raise refuse(f"{field}.type", f"= {weights.get('type')!r} is not read (only 'int' is)")
    if weights.get("actorder") not in (None, "weight", "static"):
        raise refuse(f"{field}.actorder", f"= {weights.get('actorder')!r} (a column permutation) is not read")
    if weights.get("dynamic"):
        raise refuse(f"{field}.dynamic", "= true is not read")
    strategy = weights.get("strategy")
    if strategy == "channel":
        return None, bool(weights.get("symmetric", True))
    if strategy != "group":
        raise refuse(f"{field}.strategy", f"= {strategy!r} is not read (only 'group' and 'channel' are)")
    return _group(weights.get("group_size"), f"{field}.group_size", refuse), bool(weights.get("symmetric", True))


# -- tensors ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int4Tensors:
    """Where one int4 weight's stored tensors are (infos with .shard, .dtype, .shape), and its size."""

    prefix: str                  # the module: its tensors are prefix + "." + suffix
    parts: dict                  # suffix -> tensor info
    out_features: int            # N
    in_features: int             # K


def split_int4(fmt: Int4Checkpoint, tensors: dict, read: Callable[[str], torch.Tensor], where):
    """Split a checkpoint's tensors (name -> info) into model tensors, where each int4 weight appears as
    ``P.weight`` (an info of the dequantized [N, K] in the scales' dtype), and the int4 weights
    (``P.weight`` -> Int4Tensors). Every stored part's presence, dtype and shape is checked here, before
    anything is loaded; ``read`` reads a small tensor (compressed-tensors' weight_shape, GPTQ's g_idx)."""
    first = fmt.suffixes[0]
    stored = {n for n in tensors if n.rsplit(".", 1)[-1] in fmt.suffixes}
    model = {n: i for n, i in tensors.items() if n not in stored}
    weights: dict[str, Int4Tensors] = {}
    for name in sorted(n for n in stored if n.endswith("." + first)):
        prefix = name.removesuffix("." + first)
        parts = {s: tensors[f"{prefix}.{s}"] for s in fmt.suffixes if f"{prefix}.{s}" in tensors}
        weight = _checked(fmt, prefix, parts, read, where)
        weights[f"{prefix}.weight"] = weight
        scale = parts["weight_scale" if fmt.method == "compressed-tensors" else "scales"]
        model[f"{prefix}.weight"] = type(scale)(parts[first].shard, scale.dtype, (weight.out_features,
                                                                                 weight.in_features))
    orphans = sorted(n for n in stored if n.rsplit(".", 1)[0] + ".weight" not in weights)
    if orphans:
        raise MoEOffloadError(f"{where}: tensor {orphans[0]} has no {orphans[0].rsplit('.', 1)[0]}.{first}; the "
                              f"checkpoint is incomplete or not in the {fmt.describe()} format config.json declares")
    return model, weights


def _checked(fmt: Int4Checkpoint, prefix: str, parts: dict, read, where) -> Int4Tensors:
    def bad(suffix: str, why: str) -> MoEOffloadError:
        return MoEOffloadError(f"{where}: tensor {prefix}.{suffix} {why}; the checkpoint is corrupt or not in the "
                               f"{fmt.describe()} format its config.json declares")

    def need(suffix: str, dtypes: tuple[str, ...], ndim: int):
        info = parts.get(suffix)
        if info is None:
            raise bad(suffix, f"is missing (beside {prefix}.{fmt.suffixes[0]})")
        if info.dtype.upper() not in dtypes:
            raise bad(suffix, f"is {info.dtype}, not {' or '.join(dtypes)}")
        if len(info.shape) != ndim:
            raise bad(suffix, f"has shape {list(info.shape)}, not {ndim}-D")
        return tuple(info.shape)

    def expect(suffix: str, shape: tuple, want: tuple, what: str) -> None:
        if tuple(shape) != tuple(want):
            raise bad(suffix, f"has shape {list(shape)} but {what} implies {list(want)}")

    if fmt.method == "compressed-tensors":
        n, words = need("weight_packed", ("I32",), 2)
        need("weight_shape", _INT_DTYPES, 1)
        if "weight_g_idx" in parts:
            raise bad("weight_g_idx", "exists: act-order (a column permutation) is not read")
        shape = tuple(int(v) for v in read(f"{prefix}.weight_shape").tolist())
        if len(shape) != 2 or shape[0] != n or math.ceil(shape[1] / 8) != words:
            raise bad("weight_shape", f"= {list(shape)} does not match weight_packed's shape {[n, words]}")
        k = shape[1]
        groups = need("weight_scale", _SCALE_DTYPES, 2)[1]
        expect("weight_scale", (n, groups), (n, 1 if fmt.group is None else math.ceil(k / fmt.group)),
               f"weight_shape {[n, k]} with {fmt.describe()}")
        if not fmt.symmetric:
            expect("weight_zero_point", need("weight_zero_point", ("I32",), 2), (math.ceil(n / 8), groups),
                   f"weight_scale {[n, groups]}")
    elif fmt.method == "awq":
        k, nw = need("qweight", ("I32",), 2)
        n = 8 * nw
        groups = 1 if fmt.group is None else math.ceil(k / fmt.group)
        expect("scales", need("scales", _SCALE_DTYPES, 2), (groups, n), f"qweight {[k, nw]}")
        expect("qzeros", need("qzeros", ("I32",), 2), (groups, nw), f"qweight {[k, nw]}")
    else:
        kw, n = need("qweight", ("I32",), 2)
        k = need("g_idx", ("I32", "I64"), 1)[0] if "g_idx" in parts else 8 * kw
        if math.ceil(k / 8) != kw:
            raise bad("g_idx", f"has {k} entries but qweight's {kw} rows hold {8 * kw} inputs")
        groups = 1 if fmt.group is None else math.ceil(k / fmt.group)
        expect("scales", need("scales", _SCALE_DTYPES, 2), (groups, n), f"qweight {[kw, n]}")
        expect("qzeros", need("qzeros", ("I32",), 2), (groups, math.ceil(n / 8)), f"qweight {[kw, n]}")
        if "g_idx" in parts and not torch.equal(read(f"{prefix}.g_idx").long(),
                                                torch.arange(k) // (fmt.group or k)):
            raise bad("g_idx", "is not k // group_size: act-order (a column permutation) is not read")
    if k % 2:
        raise bad(fmt.suffixes[0], f"holds {k} inputs per row; int4 weights need an even number")
    return Int4Tensors(prefix, parts, n, k)


# -- decoding (exact integer repacking) ---------------------------------------------------------------------------
def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 (or int64) words [R, C] -> their eight nibbles [R, C, 8] as uint8, nibble j = bits 4j..4j+3."""
    shifts = torch.arange(0, 32, 4, dtype=words.dtype)
    return ((words[..., None] >> shifts) & 15).to(torch.uint8)


def _pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15, K even) -> uint8 [N, K/2], byte j = codes[2j] | codes[2j+1] << 4."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def read_int4(fmt: Int4Checkpoint, weight: Int4Tensors, read: Callable[[str], torch.Tensor]) -> Int4Weight:
    """One int4 weight from its stored tensors, in the project's byte order (``read(name)`` reads a tensor)."""
    n, k, prefix = weight.out_features, weight.in_features, weight.prefix
    group = fmt.group or k
    if fmt.method == "compressed-tensors":
        q = read(f"{prefix}.weight_packed").contiguous().view(torch.uint8)[:, : k // 2]        # [N, K/2]
        scale = read(f"{prefix}.weight_scale")                                                 # [N, ceil(K/G)]
        if fmt.symmetric:
            zero = torch.full(scale.shape, 8, dtype=torch.uint8)
        else:
            words = read(f"{prefix}.weight_zero_point")                                        # [N/8, ceil(K/G)]
            zero = _nibbles(words).permute(0, 2, 1).reshape(-1, words.shape[1])[:n]
        return Int4Weight(q.contiguous(), scale, zero, group)
    scale = read(f"{prefix}.scales").t()                                                       # [N, ceil(K/G)]
    words = read(f"{prefix}.qzeros")
    if fmt.gptq_v1:
        words = (words.long() + _GPTQ_V1_OFFSET) & 0xFFFFFFFF
    zero = _nibbles(words).reshape(words.shape[0], -1)                                         # [ceil(K/G), 8 * N/8]
    codes = read(f"{prefix}.qweight")
    if fmt.method == "awq":
        order = torch.tensor(_AWQ_REVERSE_ORDER)
        zero = zero.view(zero.shape[0], -1, 8)[..., order].reshape(zero.shape[0], -1)
        codes = _nibbles(codes)[..., order].reshape(k, n)                                      # [K, N]
    else:
        codes = _nibbles(codes).permute(0, 2, 1).reshape(-1, n)[:k]                            # [K, N]
    return Int4Weight(_pack_pairs(codes.t()), scale.contiguous(), zero[:, :n].t().contiguous(), group)
