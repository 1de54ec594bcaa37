"""from_pretrained: dense weights to the device, routed experts to the host store."""

from __future__ import annotations

import gc
import os
import re
import traceback

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel

from ..cache import (
    ExpertCache,
    ExpertLayout,
    ExpertSlots,
    SlotPools,
    make_policy,
    slot_pools,
)
from ..errors import MoEOffloadError
from ..runtime.calibrate import measure_profile
from ..runtime.cost import CostModel, HardwareProfile
from ..runtime.engine import Engine
from ..runtime.experts import OffloadedExperts
from ..runtime.offload import OffloadRuntime
from ..runtime.router_tap import RouterTap
from ..runtime.stats import OffloadStats
from ..transfer import CopyEngine, ExpertShape, HostExpertStore
from .adapters import ModelAdapter, adapter_for
from .budget import MemoryPlan, plan_memory
from .checkpoint import Checkpoint, resolve_model_dir
from .config import OffloadConfig
from .skeleton import ExpertsSite, build_skeleton, find_experts
from .validate import check_config, check_tensors


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
    """What inspecting a checkpoint tells before anything big is allocated."""

    def __init__(self, model_path: str | os.PathLike, cfg: OffloadConfig):
        self.directory = resolve_model_dir(model_path)
        self.checkpoint = Checkpoint(self.directory)
        self.hf_config = load_config(self.directory)
        self.adapter: ModelAdapter = adapter_for(self.hf_config)
        check_config(self.hf_config, self.adapter, self.directory / "config.json")
        self.dtype = cfg.dtype or checkpoint_dtype(self.hf_config)
        self.model = build_skeleton(self.hf_config, self.dtype)
        self.sites: list[ExpertsSite] = find_experts(self.model, self.adapter)
        first = self.sites[0].module
        num_experts, two_i, hidden = first.gate_up_proj.shape
        self.num_experts = num_experts
        self.shape = ExpertShape(hidden=hidden, intermediate=two_i // 2)
        check_tensors(self)  # every tensor present, shaped and typed as config.json implies
        self.plan: MemoryPlan = plan_memory(
            cfg,
            dense_bytes=self._dense_bytes(),
            bytes_per_expert=self.shape.numel * self.dtype.itemsize,
            num_moe_layers=len(self.sites),
            experts_per_layer=num_experts,
            kv_bytes_per_token=self.adapter.kv_bytes_per_token(self.hf_config, self.dtype.itemsize),
        )

    def _dense_bytes(self) -> int:
        expert_params = {id(p) for s in self.sites for p in s.module.parameters()}
        return sum(p.numel() * self.dtype.itemsize for p in self.model.parameters() if id(p) not in expert_params)


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
        tensor = parts.checkpoint.get(disk_name)
        if tensor.is_floating_point() and not _keeps_fp32(model, name):
            tensor = tensor.to(parts.dtype)
        _set_tensor(model, name, tensor.to(device))
    for name, buf in model.named_buffers():
        if buf.device != device:
            _set_tensor(model, name, buf.to(device))
    model.tie_weights()


def _write(store: HostExpertStore, key: int, role: str, tensor: torch.Tensor, name: str) -> None:
    try:
        store.write(key, role, tensor)
    except ValueError as err:
        raise MoEOffloadError(f"tensor {name}: {err}; the weights and config.json do not belong together") from None


def fill_store(parts: ModelParts, store: HostExpertStore, progress: bool) -> None:
    """Read routed experts tensor by tensor from safetensors into the host store."""
    ordinal = {s.model_layer: i for i, s in enumerate(parts.sites)}
    names = [(n, parts.adapter.expert_tensor(n)) for n in parts.checkpoint.tensors]
    names = [(n, t) for n, t in names if t is not None]
    for name, t in tqdm(names, desc="experts -> host", unit="tensor", disable=not progress, leave=False):
        if t.layer not in ordinal:
            raise MoEOffloadError(
                f"checkpoint has routed experts for layer {t.layer} ({name}) but config.json makes it dense"
            )
        layer = ordinal[t.layer]
        if t.expert is not None:
            if t.expert >= store.num_experts:
                raise MoEOffloadError(f"{name}: expert {t.expert} >= num_experts {store.num_experts} in config.json")
            _write(store, store.key(layer, t.expert), t.role, parts.checkpoint.get(name).to(store.dtype), name)
            continue
        role = "gate_up" if t.role == "gate_up" else "down"
        for e in range(store.num_experts):
            _write(store, store.key(layer, e), role, parts.checkpoint.get_slice(name, e).to(store.dtype), name)


def check_complete(parts: ModelParts, store: HostExpertStore) -> None:
    missing = [n for n, p in parts.model.named_parameters() if p.is_meta]
    if missing:
        raise MoEOffloadError(
            f"checkpoint {parts.directory} lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}; "
            "the checkpoint is incomplete or does not match config.json"
        )
    absent = store.missing_keys()
    if absent:  # check_tensors catches this first; the store's own record is the last guard
        layer, expert = divmod(absent[0], store.num_experts)
        raise MoEOffloadError(
            f"checkpoint {parts.directory} lacks weights of {len(absent)} routed expert(s), e.g. the "
            f"{'/'.join(store.missing_parts(absent[0]))} projection of expert {expert} of MoE layer {layer} "
            f"(model layer {parts.sites[layer].model_layer}); the checkpoint is incomplete"
        )


def make_cpu_runner(cfg: OffloadConfig, parts: ModelParts):
    """The CPU expert runner, compiled now so no JIT happens at the first token; None if unused."""
    if cfg.resolved_cpu_experts == "never":
        return None
    from ..cpu_kernels import CpuRunner

    runner = CpuRunner(num_threads=cfg.cpu_threads)
    runner.warmup(dtypes=[str(parts.dtype).removeprefix("torch.")], acts=[parts.hf_config.hidden_act])
    return runner


def cost_model(cfg: OffloadConfig, parts: ModelParts, store: HostExpertStore, slots: ExpertSlots, runner) -> CostModel:
    """Costs from the named hardware profile, or measured now on one expert."""
    if cfg.hardware is not None:
        profile = HardwareProfile.from_yaml(cfg.hardware)
    else:
        profile = measure_profile(store.block(0), slots.buffers[0], parts.shape, runner, repeats=3)
    return CostModel.for_expert(profile, parts.shape.hidden, parts.shape.intermediate, parts.dtype.itemsize)


def expert_pools(parts: ModelParts, cfg: OffloadConfig) -> tuple[ExpertLayout, SlotPools]:
    """The model's expert layout and the slot pools of ``cfg.slot_allocation``."""
    layout = ExpertLayout(len(parts.sites), parts.num_experts, parts.hf_config.num_experts_per_tok)
    try:
        return layout, slot_pools(cfg.slot_allocation, parts.plan.slots, layout)
    except ValueError as err:
        raise MoEOffloadError(f"slot_allocation {cfg.slot_allocation!r}: {err}; give more expert slots "
                              "or use slot_allocation='global'") from None


def attach_prefetcher(model: PreTrainedModel, cfg: OffloadConfig, parts: ModelParts) -> None:
    """Predictor-driven prefetch for the next ``prefetch_depth`` layers, unless predictor is 'none'."""
    name = cfg.resolved_predictor
    if name == "none" or cfg.prefetch_depth == 0:
        return
    from ..predictor.registry import load_predictor
    from ..runtime.prefetch import Prefetcher
    from .router_params import router_params

    try:
        predictor = load_predictor(name, parts.directory, router_params(model))
    except (ValueError, FileNotFoundError) as err:
        raise MoEOffloadError(f"predictor {name!r}: {err}") from None
    protocol = model.offload.engine.protocol
    width = cfg.prefetch_width or parts.hf_config.num_experts_per_tok
    protocol.prefetcher = Prefetcher(predictor, protocol.residency, protocol.layout, protocol.stats,
                                     cfg.prefetch_depth, width)


def assemble(parts: ModelParts, cfg: OffloadConfig) -> PreTrainedModel:
    device = cfg.torch_device
    layout, pools = expert_pools(parts, cfg)
    store = HostExpertStore(len(parts.sites), parts.num_experts, parts.shape, parts.dtype,
                            pin=torch.cuda.is_available() and device.type == "cuda")
    for site in parts.sites:  # drop the meta expert parameters before anything is loaded
        setattr(site.parent, site.attr, nn.Identity())
    load_dense(parts, device)
    fill_store(parts, store, cfg.progress)
    slots = ExpertSlots(parts.plan.slots, store.num_keys, parts.shape.numel, parts.dtype, device)
    cache = ExpertCache(slots, make_policy(cfg.cache_policy, layout, **cfg.policy_params), pools)
    stats = OffloadStats(len(parts.sites), store.bytes_per_expert)
    copier = CopyEngine(store, slots.buffers, backend=cfg.resolved_copy_backend, seed=cfg.copy_seed)
    runner = make_cpu_runner(cfg, parts)
    costs = cost_model(cfg, parts, store, slots, runner) if cfg.resolved_cpu_experts == "auto" else None
    engine = Engine(store, layout, cache, copier, stats, cfg.resolved_cpu_experts, costs, runner,
                    parts.hf_config.hidden_act)
    for i, site in enumerate(parts.sites):
        setattr(site.parent, site.attr,
                OffloadedExperts(engine, i, site.model_layer, parts.num_experts, site.module.act_fn))
    check_complete(parts, store)
    model = parts.model
    model.config._name_or_path = str(parts.directory)
    if (parts.directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(parts.directory)
    tap = RouterTap([getattr(s.parent, parts.adapter.router_attr) for s in parts.sites], parts.adapter.router_scoring)
    tap.add(engine.protocol.on_router)
    model.offload = OffloadRuntime(cfg, parts.plan, store, engine, [s.model_layer for s in parts.sites], tap)
    model.offload.guard_forward(model)
    attach_prefetcher(model, cfg, parts)
    return model


def from_pretrained(model: str | os.PathLike, config: OffloadConfig | None = None, **fields) -> PreTrainedModel:
    """Load a local HF MoE checkpoint with its routed experts offloaded.

    ``model`` is a checkpoint directory or a shipped model name ('tiny-mixtral');
    ``fields`` override ``config`` (an OffloadConfig). Returns the transformers
    model, with ``model.offload`` (an OffloadRuntime) for statistics.
    """
    cfg = (config or OffloadConfig()).replace(**fields) if fields else (config or OffloadConfig())
    parts = None
    try:
        parts = ModelParts(model, cfg)
        return assemble(parts, cfg)
    except BaseException as err:
        # Nothing half-loaded stays referenced: drop our locals and those the
        # traceback's frames hold, so a caught error keeps no weights alive.
        del parts
        traceback.clear_frames(err.__traceback__)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise
