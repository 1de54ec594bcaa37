"""from_pretrained: dense weights to the device, routed experts to the host store."""

from __future__ import annotations

import gc
import os
import threading
import traceback

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel

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
from ..runtime.dense_cpu import choose_dense_precision
from ..runtime.engine import Engine
from ..runtime.experts import OffloadedExperts
from ..runtime.offload import OffloadRuntime
from ..runtime.router_tap import RouterTap
from ..runtime.stats import OffloadStats
from ..transfer import CopyEngine, HostExpertStore
from .config import OffloadConfig
from .expert_writes import fp8_as_stored, int4_as_stored, write_expert
from .parts import ModelParts, load_dense


def fill_store(parts: ModelParts, store: HostExpertStore, progress: bool, device: torch.device | None = None) -> None:
    """Read routed experts tensor by tensor from safetensors into the host store, quantizing them into a
    packed format on ``device`` (a GPU quantizes in milliseconds what takes the CPU seconds; on the CPU the
    Numba quantizers use every core); a block-FP8 checkpoint's 128x128 fp8 weights go into an fp8 store as
    they are. The progress bar counts whole experts (experts/s, ETA)."""
    ordinal = {s.model_layer: i for i, s in enumerate(parts.sites)}
    names = [(n, parts.adapter.expert_tensor(n)) for n in parts.checkpoint.tensors]
    names = [(n, t) for n, t in names if t is not None and t.layer < parts.hf_config.num_hidden_layers]
    desc = f"experts -> host ({store.format.name})" if store.format.packed else "experts -> host"
    with tqdm(total=store.num_keys, desc=desc, unit="expert", disable=not progress, leave=False) as bar:
        for name, t in names:
            if t.layer not in ordinal:
                raise MoEOffloadError(
                    f"checkpoint has routed experts for layer {t.layer} ({name}) but config.json makes it dense"
                )
            layer = ordinal[t.layer]
            if t.expert is not None:
                if t.expert >= store.num_experts:
                    raise MoEOffloadError(f"{name}: expert {t.expert} >= num_experts {store.num_experts} in "
                                          "config.json")
                _write_counted(parts, store, store.key(layer, t.expert), t.role, name, (), device, bar)
                continue
            role = "gate_up" if t.role == "gate_up" else "down"
            for e in range(store.num_experts):
                _write_counted(parts, store, store.key(layer, e), role, name, (e,), device, bar)


def _write_counted(parts: ModelParts, store: HostExpertStore, key: int, role: str, name: str, index: tuple,
                   device: torch.device | None, bar: tqdm) -> None:
    """write_expert, then one tick of ``bar`` when that write completed the expert."""
    write_expert(parts, store, key, role, name, index, device)
    if store.filled[key].all():
        bar.update(1)


def fill_experts(parts: ModelParts, store: HostExpertStore, cfg: OffloadConfig) -> None:
    """The store's experts: rows that are the checkpoint's bytes unchanged are read straight into the store;
    a packed format is read from its quantize-once cache file when one matches the checkpoint, else
    quantized now and the file written for the next load. (A block-FP8 checkpoint's 128x128 experts go
    into an fp8 store as they are, an int4 checkpoint's repacked into an int4 store, and a GGUF's experts
    into a GGUF-format store: nothing to cache.)"""
    if (not store.format.packed or fp8_as_stored(parts, store) or int4_as_stored(parts, store)
            or store.format.name == "gguf"):
        if not read_stored_rows(parts, store, cfg):
            fill_store(parts, store, cfg.progress, cfg.torch_device)
        return
    from . import quant_cache

    shards = sorted({info.shard for info in parts.checkpoint.tensors.values()})
    key = quant_cache.cache_key(shards, store.format, store.num_keys)
    path = quant_cache.cache_path(cfg.quant_cache, key, store.format.name)
    if quant_cache.load_cached(path, key, store, cfg.progress):
        return
    fill_store(parts, store, cfg.progress, cfg.torch_device)
    quant_cache.save_cache(path, key, store)


def read_stored_rows(parts: ModelParts, store: HostExpertStore, cfg: OffloadConfig) -> bool:
    """When the store's rows are the checkpoint's bytes unchanged, read them straight from the shards into
    the rows with positional reads, ``disk_threads`` in flight (the disk's speed, no staging copy). False
    when the rows need a cast or quantization (then ``fill_store``)."""
    from ..transfer.disk import DiskReader
    from .disk_source import checkpoint_runs

    runs = checkpoint_runs(parts, store.format)
    if runs is None or len(runs) != store.num_keys:
        return False
    rows = store.blocks.view(torch.uint8)
    order = sorted(range(store.num_keys), key=lambda k: min((r.path, r.offset) for r in runs[k]))   # file order
    faulted = _fault_ahead(rows, order)
    reader = DiskReader(cfg.disk_threads)
    try:
        reads = []
        for i, key in enumerate(order):
            faulted[i].wait()
            reads.append(reader.submit(runs[key], rows[key].numpy()))
        for read in tqdm(reads, desc="experts -> host", unit="expert", disable=not cfg.progress, leave=False):
            read.wait()
    finally:
        reader.close()
    for key in range(store.num_keys):
        roles = {part for run in runs[key] for part in _parts_at(store, key, run.dest, run.nbytes)}
        store.filled[key, sorted(roles)] = True
    return True


def _fault_ahead(rows: torch.Tensor, order: list[int]) -> list[threading.Event]:
    """Touch every page of the rows, in read order, on a thread of its own: the kernel's page faults (it zeroes
    each new page) then run ahead of the disk reads instead of inside them, where the reader threads would
    contend for them."""
    done = [threading.Event() for _ in order]

    def touch() -> None:
        for i, key in enumerate(order):
            rows[key].numpy()[::4096] = 0
            done[i].set()

    threading.Thread(target=touch, name="moe-fault-ahead", daemon=True).start()
    return done


def _parts_at(store: HostExpertStore, key: int, dest: int, nbytes: int) -> list[int]:
    """The projections (PARTS indexes: gate 0, up 1, down 2) a run of ``nbytes`` at byte ``dest`` of expert
    ``key``'s row covers."""
    fmt = store.format
    if fmt.name == "gguf":    # per-layer projection sizes
        layer = key // store.num_experts
        where = fmt.offsets(layer)
        bounds = [where["gate"], where["up"], where["down"], fmt.layer_bytes(layer)]
    else:
        item = store.blocks.element_size()
        h, i = store.shape.hidden, store.shape.intermediate
        bounds = [0, i * h * item, 2 * i * h * item, 3 * i * h * item]
    return [p for p in range(3) if dest < bounds[p + 1] and dest + nbytes > bounds[p]]


def check_complete(parts: ModelParts, store: HostExpertStore | None) -> None:
    missing = [n for n, p in parts.model.named_parameters() if p.is_meta]
    if missing:
        raise MoEOffloadError(
            f"checkpoint {parts.directory} lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}; "
            "the checkpoint is incomplete or does not match config.json"
        )
    absent = [] if store is None else store.missing_keys()   # (a disk tier reads experts later: none loaded)
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
    fmt = parts.format
    runner.warmup(dtypes=[] if fmt.packed else [fmt.name], acts=[parts.hf_config.hidden_act],
                  packed=[fmt.name] if fmt.packed and fmt.numba else [])
    return runner


def cost_model(cfg: OffloadConfig, parts: ModelParts, store: HostExpertStore, slots: ExpertSlots, runner) -> CostModel:
    """Costs from the named hardware profile, or measured now on one expert; the CPU runner then uses the
    profile's measured backend choices (Numba or torch per format and token count) when it has them."""
    if cfg.hardware is not None:
        profile = HardwareProfile.from_yaml(cfg.hardware)
        if runner is not None and profile.cpu_backend:
            runner.set_choices(profile.cpu_backend)
    else:
        fmt = store.format.at(0)   # (the store's first row is an expert of MoE layer 0)
        profile = measure_profile(store.blocks[0], slots.buffers[0], parts.shape, runner, repeats=3, fmt=fmt,
                                  cpu_formats=None if fmt.numba else [])
    return CostModel.for_expert(profile, parts.shape.hidden, parts.shape.intermediate, parts.dtype.itemsize,
                                parts.format.nbytes, parts.format.name)


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
    depth = cfg.resolved_prefetch_depth
    if name == "none" or depth == 0:
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
                                     depth, width)


def assemble(parts: ModelParts, cfg: OffloadConfig) -> PreTrainedModel:
    device = cfg.torch_device
    layout, pools = expert_pools(parts, cfg)
    disk = parts.plan.disk_tier
    store = HostExpertStore(len(parts.sites), parts.num_experts, parts.shape, parts.dtype,
                            pin=torch.cuda.is_available() and device.type == "cuda", fmt=parts.format,
                            capacity=parts.plan.host_rows if disk else None)
    for site in parts.sites:  # drop the meta expert parameters before anything is loaded
        setattr(site.parent, site.attr, nn.Identity())
    load_dense(parts, device)
    if device.type == "cpu":
        choose_dense_precision(parts.model, parts.dtype, cfg.cpu_dense)
    if disk:
        from .disk_source import expert_runs

        runs, source = expert_runs(parts, store.format, cfg.quant_cache, cfg.progress)
    else:
        fill_experts(parts, store, cfg)
    slots = ExpertSlots(parts.plan.slots, store.num_keys, store.format.row_numel, store.format.row_dtype, device)
    cache = ExpertCache(slots, make_policy(cfg.cache_policy, layout, **cfg.policy_params), pools)
    stats = OffloadStats(len(parts.sites), store.bytes_per_expert)
    copier = CopyEngine(store, slots.buffers, backend=cfg.resolved_copy_backend, seed=cfg.copy_seed)
    runner = make_cpu_runner(cfg, parts)
    costs = cost_model(cfg, parts, store, slots, runner) if cfg.resolved_cpu_experts == "auto" else None
    engine = Engine(store, layout, cache, copier, stats, cfg.resolved_cpu_experts, costs, runner,
                    parts.hf_config.hidden_act, cfg.host_wait)
    if disk:
        engine.protocol.residency.host = host_tier(cfg, layout, store, runs, source, copier, stats)
    for i, site in enumerate(parts.sites):
        setattr(site.parent, site.attr,
                OffloadedExperts(engine, i, site.model_layer, parts.num_experts, site.module.act_fn))
    check_complete(parts, None if disk else store)
    parts.checkpoint.close()   # its memory maps would keep every page read through them resident
    model = parts.model
    model.config._name_or_path = str(parts.directory)
    if (parts.directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(parts.directory)
    adapter = parts.adapter
    tap = RouterTap(parts.routers(), adapter.router_scoring, adapter.router_outputs)
    tap.add(engine.protocol.on_router)
    model.offload = OffloadRuntime(cfg, parts.plan, store, engine, [s.model_layer for s in parts.sites], tap)
    model.offload.guard_forward(model)
    attach_prefetcher(model, cfg, parts)
    return model


def host_tier(cfg: OffloadConfig, layout: ExpertLayout, store: HostExpertStore, runs, source: str, copier,
              stats: OffloadStats):
    """The host expert cache over the disk: ``store``'s rows under the ``host_policy``, reads of ``runs``."""
    from ..runtime.host_tier import HostTier
    from ..transfer.disk import DiskReader

    rows = store.capacity
    cache = ExpertCache(ExpertSlots.bookkeeping(rows, store.num_keys),
                        make_policy(cfg.host_policy, layout, **(cfg.policy_params if cfg.host_policy == "score" else {})),
                        slot_pools("global", rows, layout))
    return HostTier(store, cache, DiskReader(cfg.disk_threads), runs, copier, stats, source)


def from_pretrained(model: str | os.PathLike, config: OffloadConfig | None = None, **fields) -> PreTrainedModel:
    """Load a local HF MoE checkpoint with its routed experts offloaded.

    ``model`` is a checkpoint directory, a GGUF file (or the first file of a split set) or a shipped model
    name ('tiny-mixtral');
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
