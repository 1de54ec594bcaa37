"""ModelParts: what inspecting a checkpoint tells before anything big is allocated, and its dense tensors."""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ..cpu_kernels.ggml_blocks import GGML_TYPES
from ..cpu_kernels.gguf_format import GGUFExpertFormat
from ..cpu_kernels.packed import FP8_BLOCK, ExpertFormat
from ..errors import MoEOffloadError
from ..transfer import ExpertShape
from .adapters import ModelAdapter, adapter_for
from .budget import MemoryPlan, plan_memory
from .checkpoint import Checkpoint, read_format, resolve_model_dir
from .config import OffloadConfig
from .int4_checkpoint import Int4Checkpoint
from .gguf_checkpoint import GGUFCheckpoint, is_gguf
from .gguf_config import gguf_config
from .skeleton import ExpertsSite, build_skeleton, find_experts
from .validate import check_config, check_tensors


GGUF_DTYPE = torch.bfloat16    # a GGUF's dense weights are dequantized into this unless ``dtype`` says otherwise


def load_config(directory: os.PathLike) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as err:
        raise MoEOffloadError(f"cannot read {directory}/config.json: {str(err).splitlines()[0]}") from None


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class ModelParts:
    """What inspecting a checkpoint tells before anything big is allocated.

    ``weights=False`` reads config.json alone (``checkpoint`` is None): sizes, the memory plan and the
    expert shape, for planning and simulation before the weights are downloaded (a shape preset such as
    'mixtral-8x7b' is such a directory)."""

    def __init__(self, model_path: str | os.PathLike, cfg: OffloadConfig, weights: bool = True):
        gguf = is_gguf(model_path)
        if gguf:   # one file (or the first of a split set): metadata, vocabulary and tensors together
            self.directory = Path(model_path).expanduser()
            if not self.directory.is_file():
                raise MoEOffloadError(f"GGUF file {self.directory} does not exist")
            self.checkpoint = GGUFCheckpoint(self.directory)
            self.hf_config = gguf_config(self.checkpoint)
            where = self.directory
        else:
            self.directory = resolve_model_dir(model_path)
            self.checkpoint = Checkpoint(self.directory) if weights else None
            self.hf_config = load_config(self.directory)
            where = self.directory / "config.json"
        # the weight format (None: unquantized, or BlockFP8); any other quantization is refused here, by name
        self.quantization = self.checkpoint.quantization if self.checkpoint else read_format(self.directory)
        self.adapter: ModelAdapter = adapter_for(self.hf_config)
        check_config(self.hf_config, self.adapter, where)
        self.dtype = cfg.dtype or (GGUF_DTYPE if gguf else checkpoint_dtype(self.hf_config))
        self.model = build_skeleton(self.hf_config, self.dtype)
        self.sites: list[ExpertsSite] = find_experts(self.model, self.adapter)
        first = self.sites[0].module
        num_experts, two_i, hidden = first.gate_up_proj.shape
        self.num_experts = num_experts
        self.shape = ExpertShape(hidden=hidden, intermediate=two_i // 2)
        if gguf:
            self.checkpoint.bind(self.model, [s.model_layer for s in self.sites], num_experts, hidden, two_i // 2)
        self.format = self._expert_format(cfg)
        if self.checkpoint is not None:
            check_tensors(self)  # every tensor present, shaped and typed as config.json implies
        self.plan = self._memory_plan(cfg)

    def _expert_format(self, cfg: OffloadConfig) -> ExpertFormat:
        if self.is_gguf:
            return gguf_expert_format(cfg, self)
        return expert_format(cfg, self.shape, self.dtype, self.quantization)

    def _memory_plan(self, cfg: OffloadConfig) -> MemoryPlan:
        return plan_memory(
            cfg,
            dense_bytes=self._dense_bytes(),
            bytes_per_expert=self.format.nbytes,
            num_moe_layers=len(self.sites),
            experts_per_layer=self.num_experts,
            kv_bytes_per_token=self.adapter.kv_bytes_per_token(self.hf_config, self.dtype.itemsize),
        )

    def replanned(self, cfg: OffloadConfig) -> "ModelParts":
        """These parts with the format and memory plan of another ``cfg`` of the same compute dtype (expert
        format, memory budget, KV reserve), without building the skeleton again (what a planner's search
        varies)."""
        if (cfg.dtype or self.dtype) != self.dtype:
            raise ValueError(f"replanned keeps the compute dtype {self.dtype}; got {cfg.dtype}")
        other = copy.copy(self)
        other.format = other._expert_format(cfg)
        other.plan = other._memory_plan(cfg)
        return other

    def _dense_bytes(self) -> int:
        expert_params = {id(p) for s in self.sites for p in s.module.parameters()}
        return sum(p.numel() * self.dtype.itemsize for p in self.model.parameters() if id(p) not in expert_params)

    @property
    def has_weights(self) -> bool:
        return self.checkpoint is not None

    @property
    def is_gguf(self) -> bool:
        return isinstance(self.checkpoint, GGUFCheckpoint)

    def describe_checkpoint(self) -> str:
        """The checkpoint's format, for `info`."""
        if self.is_gguf:
            return f"{self.checkpoint.describe()} (dense weights dequantized to {self.dtype} on read)"
        if self.quantization:
            return f"{self.quantization.describe()} (dense weights dequantized to {self.dtype} on read)"
        return "unquantized"

    def routers(self) -> list[nn.Module]:
        """The router module beside each MoE layer's experts, in MoE-layer order."""
        return [getattr(s.parent, self.adapter.router_attr) for s in self.sites]


def expert_format(cfg: OffloadConfig, shape: ExpertShape, dtype: torch.dtype, quantization=None) -> ExpertFormat:
    """The routed experts' stored format: ``cfg.expert_dtype``; unset, fp8 for a block-FP8 checkpoint whose
    blocks are the format's 128x128 (its bytes are kept as they are), the int4 format that holds an int4
    checkpoint's weights exactly (repacked, not re-quantized), else the compute dtype."""
    if isinstance(quantization, Int4Checkpoint):
        default = quantization.expert_format
    elif quantization is not None and tuple(quantization.block) == (FP8_BLOCK, FP8_BLOCK):
        default = "fp8"
    else:
        default = str(dtype).removeprefix("torch.")
    name = cfg.expert_dtype or default
    try:
        return ExpertFormat(name, shape.hidden, shape.intermediate, dtype)
    except ValueError as err:
        raise MoEOffloadError(f"expert_dtype {name!r}: {err}") from None


def gguf_expert_format(cfg: OffloadConfig, parts: "ModelParts") -> ExpertFormat:
    """A GGUF file's routed experts: kept in the file's blocks (GGUFExpertFormat) unless ``cfg.expert_dtype``
    names another format. A type the GGUF format does not keep is refused by name, or, with an explicit
    ``expert_dtype``, dequantized into it with a warning that says the bytes it costs."""
    ckpt = parts.checkpoint
    unread = ckpt.unread_expert_types()
    if cfg.expert_dtype is None:
        if unread:
            name, kind = next(iter(unread.items()))
            raise MoEOffloadError(
                f"{ckpt.path}: routed-expert tensor {name} is {kind}; moe-offload keeps GGUF experts of types "
                f"{', '.join(sorted(t.name for t in GGML_TYPES.values()))} as stored. Pass expert_dtype "
                "(--expert-dtype bfloat16, int8, int4, ...) to dequantize them into that format instead")
        layers = [s.model_layer for s in parts.sites]
        types = [tuple(ckpt.expert_type(layer, p) for p in ("gate", "up", "down")) for layer in layers]
        try:
            return GGUFExpertFormat(types, parts.shape.hidden, parts.shape.intermediate, parts.dtype)
        except ValueError as err:
            raise MoEOffloadError(f"{ckpt.path}: routed experts: {err}") from None
    fmt = expert_format(cfg, parts.shape, parts.dtype)
    if unread:
        stored = sum(ckpt.stored[n].nbytes for n in unread) // (len(parts.sites) * parts.num_experts)
        name, kind = next(iter(unread.items()))
        warnings.warn(f"{ckpt.path}: routed experts such as {name} are {kind}, which moe-offload does not keep as "
                      f"stored; they are dequantized into {fmt.name}: {fmt.nbytes:,} bytes per expert instead of "
                      f"about {stored:,} in the file ({fmt.nbytes / max(stored, 1):.2f}x)", stacklevel=3)
    return fmt


def _keeps_fp32(model: PreTrainedModel, name: str) -> bool:
    patterns = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return any(re.search(rf"(^|\.){re.escape(p)}(\.|$)", name) for p in patterns)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def read_dense(parts: ModelParts, disk_name: str, name: str) -> torch.Tensor:
    """Dense tensor ``disk_name`` from the checkpoint, in the dtype the model keeps at ``name`` (on the CPU)."""
    tensor = parts.checkpoint.get(disk_name)
    if tensor.is_floating_point() and not _keeps_fp32(parts.model, name):
        tensor = tensor.to(parts.dtype)
    return tensor


def load_dense(parts: ModelParts, device: torch.device) -> None:
    """Every non-expert tensor of the checkpoint onto ``device``; error if any is missing."""
    model, adapter = parts.model, parts.adapter
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    for disk_name, info in parts.checkpoint.tensors.items():
        if adapter.expert_tensor(disk_name):
            continue
        name = adapter.memory_name(disk_name)
        if name not in targets:
            continue  # extra tensors (e.g. multi-token-prediction heads) that transformers ignores too
        if tuple(info.shape) != tuple(targets[name].shape):
            raise MoEOffloadError(
                f"tensor {disk_name} has shape {list(info.shape)} but config.json implies "
                f"{list(targets[name].shape)}; the weights and config.json do not belong together"
            )
        _set_tensor(model, name, read_dense(parts, disk_name, name).to(device))
    for name, buf in model.named_buffers():
        if buf.device != device:
            _set_tensor(model, name, buf.to(device))
    model.tie_weights()


def has_weights(model_path: str | os.PathLike) -> bool:
    """Whether the model holds weights: a GGUF file, or a directory with safetensors (a config-only one does not)."""
    return is_gguf(model_path) or any(resolve_model_dir(model_path).glob("*.safetensors"))
