"""Checks made before anything big is allocated or computed.

``check_config``: config.json's sizes and routing fields are consistent.
``check_tensors``: every tensor the model needs is in the checkpoint, with the
shape config.json implies and a floating dtype; routed experts projection by
projection (gate, up, down, or the fused gate_up / down of newer checkpoints).
Both raise MoEOffloadError naming the field or the tensor.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig

from ..errors import MoEOffloadError
from .adapters import ModelAdapter

# safetensors dtype names: F16, BF16, F32, F64, F8_E4M3, F8_E5M2, ... are floating;
# BOOL, U8, I8, I16, I32, I64, ... are not.
_FLOAT_PREFIXES = ("F", "BF")
_MAX_NAMES = 3


def _is_float(safetensors_dtype: str) -> bool:
    return safetensors_dtype.upper().startswith(_FLOAT_PREFIXES)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_config(config: PretrainedConfig, adapter: ModelAdapter, where: str | Path) -> None:
    """Raise MoEOffloadError naming the first config.json field that makes no sense."""
    def bad(field: str, why: str) -> MoEOffloadError:
        return MoEOffloadError(f"{where}: {field} = {getattr(config, field, None)!r} {why}; fix config.json")

    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                adapter.experts_field, adapter.expert_size_field, "num_experts_per_tok")
    for field in required:
        if not _positive_int(getattr(config, field, None)):
            raise bad(field, "must be a positive integer")
    for field in ("intermediate_size", "num_key_value_heads", "decoder_sparse_step"):
        value = getattr(config, field, None)
        if value is not None and not _positive_int(value):
            raise bad(field, "must be a positive integer")
    experts, top_k = getattr(config, adapter.experts_field), config.num_experts_per_tok
    if top_k > experts:
        raise bad("num_experts_per_tok", f"exceeds the {experts} routed experts ({adapter.experts_field})")
    if adapter.groups_experts(config):
        _check_groups(config, adapter, experts, top_k, bad)


def _check_groups(config, adapter: ModelAdapter, experts: int, top_k: int, bad) -> None:
    """DeepSeek's group-limited routing: experts split evenly into n_group groups, topk_group of them kept."""
    groups, kept = getattr(config, "n_group", None), getattr(config, "topk_group", None)
    if not _positive_int(groups):
        raise bad("n_group", "must be a positive integer")
    if experts % groups:
        raise bad("n_group", f"does not divide {adapter.experts_field} = {experts}")
    if not _positive_int(kept) or kept > groups:
        raise bad("topk_group", f"must be an integer in [1, n_group = {groups}]")
    per_group = experts // groups
    if getattr(adapter, "group_rule", None) == "top2_sum" and per_group < 2:
        raise bad("n_group", f"leaves {per_group} expert per group; {adapter.model_type} routing scores a group by "
                             "its top 2")
    if top_k > kept * per_group:
        raise bad("num_experts_per_tok", f"exceeds the {kept * per_group} experts of the topk_group = {kept} "
                                         f"groups routing keeps")


def _shape_error(name: str, got, want) -> MoEOffloadError:
    return MoEOffloadError(f"tensor {name} has shape {list(got)} but config.json implies {list(want)}; "
                           "the weights and config.json do not belong together")


def _dtype_error(name: str, dtype: str) -> MoEOffloadError:
    return MoEOffloadError(f"tensor {name} has dtype {dtype} but is a weight, which must be floating point "
                           "(F32, F16, BF16, or F8_E4M3 with block scales); the checkpoint is corrupt or "
                           "quantized in a format moe-offload does not read")


def check_tensors(parts) -> None:
    """Every tensor ``parts`` (a loader.ModelParts) needs: present, shaped as config.json implies, floating."""
    _check_dense(parts)
    _check_experts(parts)


def _check_dense(parts) -> None:
    adapter, model = parts.adapter, parts.model
    in_experts = tuple(s.name + "." for s in parts.sites)
    targets = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if not n.startswith(in_experts)}
    on_disk = {}
    for disk_name, info in parts.checkpoint.tensors.items():
        if adapter.expert_tensor(disk_name) is not None:
            continue
        name = adapter.memory_name(disk_name)
        on_disk[name] = disk_name
        target = targets.get(name)
        if target is None:
            continue  # extra tensors (e.g. multi-token-prediction heads) that transformers ignores too
        if tuple(info.shape) != tuple(target.shape):
            raise _shape_error(disk_name, info.shape, target.shape)
        if target.is_floating_point() and not _is_float(info.dtype):
            raise _dtype_error(disk_name, info.dtype)
    missing = [n for n, _ in model.named_parameters() if not n.startswith(in_experts) and n not in on_disk]
    if missing:
        raise MoEOffloadError(
            f"checkpoint {parts.directory} lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:_MAX_NAMES])}; "
            "the checkpoint is incomplete or does not match config.json"
        )


def _check_experts(parts) -> None:
    """Routed experts: per layer, each expert's gate, up and down, per expert or fused over experts."""
    ordinal = {s.model_layer: i for i, s in enumerate(parts.sites)}
    covered, fused, prefix = _scan_experts(parts, ordinal)
    adapter, num_experts = parts.adapter, parts.num_experts
    block = next((p.split(".", 3)[3] for p in prefix.values()), f"{adapter.disk_block}.experts")
    missing: dict[str, tuple[int, int | None]] = {}   # tensor name -> (model layer, expert or None if fused)
    proj = {"gate": adapter.gate_name, "up": adapter.up_name, "down": adapter.down_name}
    for layer in ordinal:
        base = prefix.get(layer, f"model.layers.{layer}.{block}")
        for e in range(num_experts):
            for part in ("gate", "up", "down"):
                if (e, part) in covered[layer]:
                    continue
                if fused.get(layer):
                    missing.setdefault(f"{base}.{'down_proj' if part == 'down' else 'gate_up_proj'}", (layer, None))
                else:
                    missing[f"{base}.{e}.{proj[part]}.weight"] = (layer, e)
    if missing:
        first, (layer, expert) = next(iter(missing.items()))
        which = f"expert {expert} of " if expert is not None else "all experts of "
        names = ", ".join(list(missing)[:_MAX_NAMES])
        raise MoEOffloadError(
            f"checkpoint {parts.directory} lacks {len(missing)} routed-expert tensor(s), e.g. {names} "
            f"({which}MoE layer {ordinal[layer]}, model layer {layer}); the checkpoint is incomplete"
        )


def _scan_experts(parts, ordinal: dict[int, int]):
    """Check every routed-expert tensor's layer, expert, shape and dtype. Returns, per model layer, the
    (expert, part) pairs present, whether the layer is stored fused, and its tensors' name prefix
    ("model.layers.L.<block>.experts" as the checkpoint spells it)."""
    adapter, shape, num_experts = parts.adapter, parts.shape, parts.num_experts
    hi, ih = (shape.intermediate, shape.hidden), (shape.hidden, shape.intermediate)
    want = {"gate": hi, "up": hi, "down": ih,
            "gate_up": (num_experts, 2 * shape.intermediate, shape.hidden), "down_fused": (num_experts, *ih)}
    covered: dict[int, set[tuple[int, str]]] = {layer: set() for layer in ordinal}
    fused: dict[int, bool] = {}
    prefix: dict[int, str] = {}
    for name, info in parts.checkpoint.tensors.items():
        t = adapter.expert_tensor(name)
        if t is None or t.layer >= parts.hf_config.num_hidden_layers:
            continue   # (layers past the model's, e.g. DeepSeek-V3's multi-token-prediction head: not built)
        if t.layer not in ordinal:
            raise MoEOffloadError(
                f"checkpoint has routed experts for layer {t.layer} ({name}) but config.json makes it dense"
            )
        if t.expert is not None and t.expert >= num_experts:
            raise MoEOffloadError(f"{name}: expert {t.expert} >= {num_experts} routed experts in config.json "
                                  f"({adapter.experts_field})")
        if tuple(info.shape) != want[t.role]:
            raise _shape_error(name, info.shape, want[t.role])
        if not _is_float(info.dtype):
            raise _dtype_error(name, info.dtype)
        prefix.setdefault(t.layer, name.split(".experts.")[0] + ".experts")
        if t.expert is None:
            fused[t.layer] = True
            parts_written = ("gate", "up") if t.role == "gate_up" else ("down",)
            covered[t.layer] |= {(e, p) for e in range(num_experts) for p in parts_written}
        else:
            covered[t.layer].add((t.expert, t.role))
    return covered, fused, prefix
