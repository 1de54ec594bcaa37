"""Tiny GPTQ, AWQ and compressed-tensors int4 checkpoints made from tests/tiny_checkpoints.py's, and their
reference dequantization (a plain checkpoint transformers loads).

compressed-tensors is written by the format's own library (compressed_tensors 0.20: ``calculate_qparams``
for the scales and zero points, ``PackedQuantizationCompressor.compress`` for the packing,
``ModelCompressor.update_config`` for config.json) and dequantized by it (``PackedQuantizationCompressor.
decompress``). GPTQ and AWQ's libraries do not install on a CPU-only machine, so their packing and
dequantization follow the reference sources line by line:

  GPTQ  gptqmodel 7.7.0, gptqmodel/nn_modules/qlinear/__init__.py
          BaseQuantLinear.pack_original (lines 1614-1740): int_weight = round(W / s + z) clamped to 0..15,
          transposed to [K, N]; qweight[row] |= int_weight[row * 8 + j] << (4 * j); qzeros[:, col] |=
          zeros[:, col * 8 + j] << (4 * j); scales float16 [K/G, N]; g_idx = k // G
          dequantize_weight / _dequantize_from_codes (lines 1042-1103): W^T = scales[g_idx] * (q - zeros[g_idx])
        gptqmodel/utils/model.py convert_gptq_v2_to_v1_format_module (lines 906-950): checkpoint_format 'gptq'
          (v1) stores qzeros - 0b00010001000100010001000100010001; the v1 -> v2 load adds it back
  AWQ   autoawq 0.2.9, awq/modules/linear/gemm.py WQLinear_GEMM.from_linear (lines 172-255): intweight
          [K, N]; qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (4 * i), order_map =
          [0, 2, 4, 6, 1, 3, 5, 7]; qzeros likewise from zeros [K/G, N]; scales float16 [K/G, N]
        awq/utils/packing_utils.py dequantize_gemm (lines 97-115): unpack_awq, reverse_awq_order
          (AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]), (iweight - izeros) * scales (groups repeated)

Every reference dequantization runs in float32, where (q - z) * s is exact.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tiny_checkpoints import FAMILIES

# Linear weights that stay unquantized: norms, routers (quantization tools skip them), embeddings, lm_head.
_KEEP = re.compile(r"norm|\.gate\.weight$|shared_expert_gate|embed_tokens|lm_head")
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)
_AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
_AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
_GPTQ_V1 = 0b00010001000100010001000100010001
# Sizes of every int4 fixture: groups of 32 split gate/up rows (K = H = 64) in two.
SIZES = {"hidden_size": 64, "expert_size": 32}


def int4_overrides(family: str) -> dict:
    """make_checkpoint overrides giving ``family`` SIZES (its routed experts' size field named as it names it)."""
    spec = FAMILIES[family]
    field = "moe_intermediate_size" if "moe_intermediate_size" in spec else "intermediate_size"
    return {"hidden_size": SIZES["hidden_size"], field: SIZES["expert_size"]}


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns -> int32 with the same bits."""
    return ((words & 0xFFFFFFFF) ^ 0x80000000).sub(0x80000000).to(torch.int32)


def minmax_int4(w: torch.Tensor, group: int | None):
    """Asymmetric min-max int4 of w [N, K]: (codes [N, K] 0..15, scale float16 [N, ng], zero [N, ng] 0..15)."""
    n, k = w.shape
    g = group or k
    ng = math.ceil(k / g)
    lo = torch.stack([w[:, i * g:(i + 1) * g].amin(1) for i in range(ng)], 1)
    hi = torch.stack([w[:, i * g:(i + 1) * g].amax(1) for i in range(ng)], 1)
    scale = ((hi - lo) / 15).clamp_min(1e-6).half()
    zero = torch.round(-lo / scale.float()).clamp(0, 15)
    cols = torch.arange(k) // g
    codes = torch.round(w / scale.float()[:, cols] + zero[:, cols]).clamp(0, 15)
    return codes.long(), scale, zero.long()


# -- GPTQ (gptqmodel pack_original) ----------------------------------------------------------------------------------
def gptq_pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int | None, v1: bool) -> dict:
    n, k = codes.shape
    int_weight = codes.t()                                                       # [K, N]
    qweight = torch.zeros(math.ceil(k / 8), n, dtype=torch.int64)
    for row in range(qweight.shape[0]):
        for j in range(min(8, k - row * 8)):
            qweight[row] |= int_weight[row * 8 + j] << (4 * j)
    zeros = zero.t()                                                             # [ng, N]
    qzeros = torch.zeros(zeros.shape[0], math.ceil(n / 8), dtype=torch.int64)
    for col in range(qzeros.shape[1]):
        for j in range(min(8, n - col * 8)):
            qzeros[:, col] |= zeros[:, col * 8 + j] << (4 * j)
    if v1:
        qzeros -= _GPTQ_V1
    return {"qweight": _as_int32(qweight), "qzeros": _as_int32(qzeros), "scales": scale.t().contiguous(),
            "g_idx": (torch.arange(k) // (group or k)).to(torch.int32)}


def gptq_dequantize(t: dict, v1: bool) -> torch.Tensor:
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"].long()
    words = qzeros.long() + _GPTQ_V1 if v1 else qzeros.long()
    zeros = ((words[:, :, None] >> _SHIFTS) & 15).reshape(qzeros.shape[0], -1)[:, :scales.shape[1]]
    weight = ((qweight.long()[:, None, :] >> _SHIFTS[None, :, None]) & 15).reshape(-1, qweight.shape[1])
    weight = weight[:g_idx.shape[0]]
    return (scales[g_idx] * (weight - zeros[g_idx])).t().contiguous()           # [N, K]


# -- AWQ (autoawq WQLinear_GEMM.from_linear) --------------------------------------------------------------------------
def awq_pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict:
    intweight = codes.t()                                                        # [K, N]
    qweight = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int64)
    for col in range(qweight.shape[1]):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + _AWQ_ORDER[i]] << (i * 4)
    zeros = zero.t()                                                             # [ng, N]
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int64)
    for col in range(qzeros.shape[1]):
        for i in range(8):
            qzeros[:, col] |= zeros[:, col * 8 + _AWQ_ORDER[i]] << (i * 4)
    return {"qweight": _as_int32(qweight), "qzeros": _as_int32(qzeros), "scales": scale.t().contiguous()}


def awq_dequantize(t: dict, group: int | None) -> torch.Tensor:
    qweight, qzeros, scales = t["qweight"].long(), t["qzeros"].long(), t["scales"].float()
    iweights = ((qweight[:, :, None] >> _SHIFTS) & 15).reshape(qweight.shape[0], -1)
    izeros = ((qzeros[:, :, None] >> _SHIFTS) & 15).reshape(qzeros.shape[0], -1)
    order = torch.arange(iweights.shape[-1]).view(-1, 8)[:, _AWQ_REVERSE_ORDER].reshape(-1)
    iweights, izeros = iweights[:, order], izeros[:, order]
    k = iweights.shape[0]
    g = group or k
    scales = scales.repeat_interleave(g, dim=0)[:k]
    izeros = izeros.repeat_interleave(g, dim=0)[:k]
    return ((iweights - izeros) * scales).t().contiguous()                      # [N, K]


# -- compressed-tensors (the library itself) --------------------------------------------------------------------------
def _ct_scheme(group: int | None, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="channel" if group is None
                            else "group", group_size=group, scale_dtype=torch.float16)
    return QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")


def ct_compress(w: torch.Tensor, group: int | None, symmetric: bool) -> dict:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = _ct_scheme(group, symmetric)
    g = group or w.shape[1]
    lo = w.view(w.shape[0], -1, g).amin(-1)
    hi = w.view(w.shape[0], -1, g).amax(-1)
    scale, zero_point = calculate_qparams(lo, hi, scheme.weights)
    state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}
    return dict(PackedQuantizationCompressor.compress(state, scheme))


def ct_dequantize(t: dict, group: int | None, symmetric: bool) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    state = dict(t) | {"weight_scale": t["weight_scale"].float()}
    return PackedQuantizationCompressor.decompress(state, _ct_scheme(group, symmetric))["weight"]


# -- checkpoints ------------------------------------------------------------------------------------------------------
def _quantizable(name: str, t: torch.Tensor, group: int | None, method: str) -> bool:
    if not (name.startswith("model.layers.") and name.endswith(".weight") and t.dim() == 2) or _KEEP.search(name):
        return False
    n, k = t.shape
    divides = method != "compressed-tensors" or group is None or k % group == 0   # compressed-tensors needs it
    return n % 8 == 0 and k % 8 == 0 and divides


def _config(method: str, group: int | None, symmetric: bool, v1: bool, ignore: list[str]) -> dict:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group or -1, "desc_act": False, "sym": False,
                "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32"}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group or -1, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
    raise ValueError(method)


def make_int4_checkpoint(source: Path, directory: Path, method: str, group: int | None = 32,
                         symmetric: bool = False, v1: bool = True) -> Path:
    """``source`` (make_checkpoint's, float32) as a ``method`` int4 checkpoint in ``directory``: every
    quantizable linear weight (see _quantizable) packed, the rest kept."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = load_file(source / "model.safetensors")
    out, ignore = {}, []
    for name, t in tensors.items():
        prefix = name.removesuffix(".weight")
        if not _quantizable(name, t, group, method):
            out[name] = t
            if name.endswith(".weight") and t.dim() == 2:
                ignore.append(prefix)
            continue
        if method == "compressed-tensors":
            packed = ct_compress(t.float(), group, symmetric)
        else:
            codes, scale, zero = minmax_int4(t.float(), group)
            packed = gptq_pack(codes, scale, zero, group, v1) if method == "gptq" else awq_pack(codes, scale, zero)
        out |= {f"{prefix}.{suffix}": v.contiguous() for suffix, v in packed.items()}
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    for extra in source.iterdir():
        if extra.name not in ("model.safetensors", "config.json"):
            shutil.copy(extra, directory / extra.name)
    config = json.loads((source / "config.json").read_text())
    if method == "compressed-tensors":
        (directory / "config.json").write_text(json.dumps(config))
        _ct_write_config(directory, group, symmetric, ignore)
    else:
        config["quantization_config"] = _config(method, group, symmetric, v1, ignore)
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def _ct_write_config(directory: Path, group: int | None, symmetric: bool, ignore: list[str]) -> None:
    """config.json's quantization_config as compressed-tensors writes it (ModelCompressor.update_config)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    config = QuantizationConfig(config_groups={"group_0": _ct_scheme(group, symmetric)}, format="pack-quantized",
                                ignore=["lm_head", *ignore], quantization_status=QuantizationStatus.COMPRESSED)
    ModelCompressor(quantization_config=config).update_config(str(directory))


def reference_dequantize(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an int4 checkpoint, its int4 weights dequantized by the reference formulas (float32)."""
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    method = config["quant_method"]
    tensors = load_file(directory / "model.safetensors")
    first = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_packed"}[method]
    if method == "compressed-tensors":
        weights = config["config_groups"]["group_0"]["weights"]
        group = weights["group_size"] if weights["strategy"] == "group" else None
        symmetric = weights["symmetric"]
    else:
        group = None if config["group_size"] == -1 else config["group_size"]
    prefixes = [n.removesuffix("." + first) for n in tensors if n.endswith("." + first)]
    out = dict(tensors)
    for prefix in prefixes:
        parts = {n.removeprefix(prefix + "."): out.pop(n) for n in list(out) if n.startswith(prefix + ".")
                 and n.removeprefix(prefix + ".") in ("qweight", "qzeros", "scales", "g_idx", "weight_packed",
                                                      "weight_scale", "weight_zero_point", "weight_shape")}
        if method == "gptq":
            w = gptq_dequantize(parts, config.get("checkpoint_format", "gptq") == "gptq")
        elif method == "awq":
            w = awq_dequantize(parts, group)
        else:
            w = ct_dequantize(parts, group, symmetric)
        out[f"{prefix}.weight"] = w.float()
    return out


def dequantized_int4_checkpoint(directory: Path, plain: Path) -> Path:
    """An unquantized copy of int4 checkpoint ``directory`` in ``plain``: the reference's weights."""
    plain.mkdir(parents=True, exist_ok=True)
    save_file(reference_dequantize(directory), plain / "model.safetensors", metadata={"format": "pt"})
    for extra in directory.iterdir():
        if extra.name not in ("model.safetensors", "config.json"):
            shutil.copy(extra, plain / extra.name)
    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config")
    (plain / "config.json").write_text(json.dumps(config))
    return plain
