"""The checkpoint formats moe-offload reads: unquantized safetensors, fine-grained (block) FP8, or int4
(GPTQ, AWQ, compressed-tensors: int4_checkpoint.py).

Block FP8 is how DeepSeek-V3/R1 and many Qwen3 releases ship: config.json carries
``"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}``; each quantized linear weight ``X.weight`` is stored as
``float8_e4m3fn`` [O, I] (fused experts: [E, O, I]) beside ``X.weight_scale_inv`` float32
[ceil(O/BO), ceil(I/BI)] (fused: [E, ...]), and the real weight is
``W[i, j] = float(q[i, j]) * scale_inv[i // BO, j // BI]``. Embeddings, norms, routers and biases stay
in the checkpoint's dtype. Every other ``quantization_config`` (but the int4 ones) is refused by name: reading its tensors as
floats would compute garbage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..cpu_kernels.packed import dequantize_fp8
from ..errors import MoEOffloadError
from .int4_checkpoint import METHODS as INT4_METHODS
from .int4_checkpoint import SUPPORTED as INT4_SUPPORTED
from .int4_checkpoint import Int4Checkpoint, int4_checkpoint_format

SCALE_SUFFIX = "_scale_inv"      # "X.weight" -> "X.weight_scale_inv"; fused "X.down_proj" -> "X.down_proj_scale_inv"
FP8_DTYPE = "F8_E4M3"            # safetensors' name of torch.float8_e4m3fn
_SUPPORTED = ("an unquantized safetensors checkpoint, block-FP8 (quant_method 'fp8', fmt 'e4m3', "
              "activation_scheme 'dynamic', weight_block_size [BO, BI], float32 weight_scale_inv), or int4: "
              + INT4_SUPPORTED)


@dataclass(frozen=True)
class BlockFP8:
    """A fine-grained FP8 checkpoint's format: e4m3 weights, one float32 scale per ``block`` of each."""

    block: tuple[int, int] = (128, 128)           # (BO, BI): rows and columns of weight one scale covers
    modules_to_not_convert: tuple[str, ...] = ()  # modules config.json declares unquantized

    def describe(self) -> str:
        return f"fp8 e4m3, {self.block[0]}x{self.block[1]} blocks"

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale_inv tensor of a weight of ``weight_shape`` ([..., O, I])."""
        *lead, out, inp = weight_shape
        return (*lead, math.ceil(out / self.block[0]), math.ceil(inp / self.block[1]))

    def declared_unquantized(self, weight_name: str) -> bool:
        """Whether config.json lists ``weight_name``'s module in modules_to_not_convert."""
        module = weight_name.removesuffix(".weight")
        return any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", module) for m in self.modules_to_not_convert)


class FP8Weight(NamedTuple):
    """A block-FP8 weight as stored: what an FP8 expert store keeps (1 byte per weight plus scales)."""

    q: torch.Tensor          # float8_e4m3fn [O, I] (or [E, O, I])
    scale_inv: torch.Tensor  # float32 [ceil(O/BO), ceil(I/BI)] (or [E, ...])
    block: tuple[int, int]   # (BO, BI)

    def dequantize(self) -> torch.Tensor:
        """float32 ``W[..., i, j] = q[..., i, j] * scale_inv[..., i // BO, j // BI]``; the last block of a
        dimension that is not a multiple of the block size is partial (ceil), as DeepSeek's kernels have it."""
        return dequantize_fp8(self.q, self.scale_inv, self.block)


def checkpoint_format(quantization_config: dict | None, where) -> BlockFP8 | Int4Checkpoint | None:
    """The format config.json's ``quantization_config`` declares: None (unquantized), BlockFP8 or an
    Int4Checkpoint. Raise MoEOffloadError naming the quant_method (or the field) for anything else."""
    if quantization_config is None:
        return None
    if not isinstance(quantization_config, dict):
        raise MoEOffloadError(f"{where}: quantization_config is {quantization_config!r}, not a mapping; fix "
                              "config.json")
    qc = quantization_config
    method = qc.get("quant_method")

    def refuse(why: str) -> MoEOffloadError:
        return MoEOffloadError(f"{where}: quantization_config quant_method {method!r} {why}; moe-offload reads "
                               f"{_SUPPORTED}; use an unquantized (bf16/fp16/fp32) release of the model")

    if str(method).lower() in INT4_METHODS:
        return int4_checkpoint_format(qc, where)
    if str(method).lower() != "fp8":
        raise refuse("is not supported")
    if str(qc.get("fmt", "e4m3")).lower() != "e4m3":
        raise refuse(f"with fmt {qc.get('fmt')!r} is not supported (only e4m3)")
    if str(qc.get("activation_scheme", "dynamic")).lower() != "dynamic":
        raise refuse(f"with activation_scheme {qc.get('activation_scheme')!r} is not supported (only dynamic)")
    if qc.get("scale_fmt", "float") != "float" or qc.get("expert_dtype", "fp8") != "fp8":
        raise refuse(f"with scale_fmt {qc.get('scale_fmt')!r} / expert_dtype {qc.get('expert_dtype')!r} "
                     "is not supported (only float32 scales, fp8 experts)")
    block = qc.get("weight_block_size", [128, 128])
    if block is None:
        raise refuse("with a per-tensor scale (weight_block_size null) is not supported")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise refuse(f"has weight_block_size {block!r}; it must be two positive integers")
    skip = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ()
    return BlockFP8(tuple(block), tuple(skip))


def split_scales(fmt: BlockFP8 | None, tensors: dict, where) -> tuple[dict, dict]:
    """Split a checkpoint's tensors (name -> info with ``.dtype``, ``.shape``) into model tensors and
    scales (weight name -> its scale_inv's info), checking every pairing. A float8 tensor outside the
    declared format is refused by name: cast to a float type it would be garbage."""
    if fmt is None:
        for name, info in tensors.items():
            if info.dtype.upper().startswith("F8"):
                raise MoEOffloadError(
                    f"{where}: tensor {name} is {info.dtype} but config.json has no quantization_config; "
                    f"moe-offload reads {_SUPPORTED}, and will not cast fp8 bytes without their scales")
        return tensors, {}
    model = {n: i for n, i in tensors.items() if not n.endswith(SCALE_SUFFIX)}
    scales = {n.removesuffix(SCALE_SUFFIX): i for n, i in tensors.items() if n.endswith(SCALE_SUFFIX)}
    for name, info in scales.items():
        _check_pair(fmt, name, model.get(name), info, where)
    for name, info in model.items():
        if info.dtype.upper().startswith("F8") and name not in scales:
            raise MoEOffloadError(f"{where}: tensor {name} is {info.dtype} but has no {name}{SCALE_SUFFIX}; "
                                  "the checkpoint is incomplete or in a format moe-offload does not read")
    return model, scales


def _check_pair(fmt: BlockFP8, name: str, weight, scale, where) -> None:
    """One quantized weight and its scale_inv: dtypes, shapes and config.json's skip list agree."""
    def bad(why: str) -> MoEOffloadError:
        return MoEOffloadError(f"{where}: {name}{SCALE_SUFFIX} {why}; the checkpoint is corrupt or not in "
                               f"the block-FP8 format its config.json declares ({fmt.describe()})")

    if weight is None:
        raise bad(f"has no weight {name}")
    if weight.dtype.upper() != FP8_DTYPE:
        raise bad(f"scales {name}, which is {weight.dtype}, not {FP8_DTYPE} (float8_e4m3fn)")
    if scale.dtype.upper() != "F32":
        raise bad(f"is {scale.dtype}; only float32 scales are supported")
    if len(weight.shape) < 2:
        raise bad(f"scales {name} of shape {list(weight.shape)}; only matrices (or fused [E, O, I]) are")
    if tuple(scale.shape) != fmt.scale_shape(tuple(weight.shape)):
        raise bad(f"has shape {list(scale.shape)} but weight shape {list(weight.shape)} with "
                  f"{fmt.block[0]}x{fmt.block[1]} blocks implies {list(fmt.scale_shape(tuple(weight.shape)))}")
    if fmt.declared_unquantized(name):
        raise bad("exists but config.json lists its module in modules_to_not_convert")
