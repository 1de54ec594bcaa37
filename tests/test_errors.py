"""Bad input raises MoEOffloadError naming the problem and the fix; nothing stays loaded."""

from __future__ import annotations

import gc
import json
import re
import shutil

import pytest
import torch
from conftest import live_objects

import moe_offload
from moe_offload import MoEOffloadError
from moe_offload.transfer import HostExpertStore

from tiny_checkpoints import make_checkpoint


def load(path, **fields):
    return moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False, **fields)


@pytest.fixture
def ckpt(tmp_path, mixtral_dir):
    return shutil.copytree(mixtral_dir, tmp_path / "copy")


def test_missing_directory(tmp_path):
    with pytest.raises(MoEOffloadError, match="does not exist.*checkpoint directory"):
        load(tmp_path / "nope")


def test_file_instead_of_directory(ckpt):
    with pytest.raises(MoEOffloadError, match="is a file"):
        load(ckpt / "config.json")


def test_no_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(MoEOffloadError, match="no config.json"):
        load(ckpt)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(MoEOffloadError, match="no safetensors weights"):
        load(ckpt)


def test_truncated_shard(ckpt):
    shard = ckpt / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(MoEOffloadError, match="truncated.*re-download"):
        load(ckpt)


def test_corrupt_header(ckpt):
    shard = ckpt / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:16] = b"#garbage"
    shard.write_bytes(bytes(data))
    with pytest.raises(MoEOffloadError, match="corrupt safetensors header"):
        load(ckpt)


def test_header_length_beyond_file(ckpt):
    shard = ckpt / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = (10**9).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    with pytest.raises(MoEOffloadError, match="corrupt safetensors header"):
        load(ckpt)


def test_missing_shard(tmp_path):
    path = make_checkpoint("mixtral", tmp_path / "m")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "s", max_shard_size="60KB")
    shards = sorted((tmp_path / "s").glob("*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(MoEOffloadError, match=f"{shards[-1].name}.*missing.*complete checkpoint"):
        load(tmp_path / "s")


def _drop_tensors(path, predicate):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not predicate(k)}, path / "model.safetensors",
              metadata={"format": "pt"})


def test_missing_dense_tensor(ckpt):
    _drop_tensors(ckpt, lambda k: k == "model.layers.1.self_attn.q_proj.weight")
    with pytest.raises(MoEOffloadError, match="lacks 1 tensor.*q_proj"):
        load(ckpt)


def test_missing_expert_tensor(ckpt):
    _drop_tensors(ckpt, lambda k: k.startswith("model.layers.2.block_sparse_moe.experts.5."))
    with pytest.raises(MoEOffloadError, match="expert 5 of MoE layer 2"):
        load(ckpt)


def test_unsupported_model_type(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoEOffloadError, match="'llama' is not supported.*mixtral"):
        load(ckpt)


def test_unknown_model_type(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "no_such_model"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoEOffloadError, match="config.json"):
        load(ckpt)


def test_budget_below_dense_weights(mixtral_dir):
    with pytest.raises(MoEOffloadError, match="smaller than the dense weights.*give at least"):
        load(mixtral_dir, gpu_memory="10KB")


def test_budget_below_one_expert(mixtral_dir):
    info = load(mixtral_dir, expert_slots=1).offload.plan
    too_small = info.fixed_bytes + info.bytes_per_expert // 2
    with pytest.raises(MoEOffloadError, match="less than one expert"):
        load(mixtral_dir, gpu_memory=too_small)
    fits = load(mixtral_dir, gpu_memory=info.fixed_bytes + 3 * info.bytes_per_expert)
    assert fits.offload.plan.slots == 3


def test_nothing_half_loaded_stays(ckpt):
    _drop_tensors(ckpt, lambda k: k.startswith("model.layers.2.block_sparse_moe.experts.5."))
    gc.collect()
    before = live_objects(HostExpertStore)
    try:
        load(ckpt)
    except MoEOffloadError as err:
        kept = err  # a caller holding on to the error must not hold the half-loaded store
    gc.collect()
    assert kept.__traceback__ is not None
    assert live_objects(HostExpertStore) == before


def test_shape_mismatch(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["hidden_size"] = 48
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoEOffloadError, match="do not belong together"):
        load(ckpt)


# --- a loader that never stores garbage: every tensor present, shaped and typed as config.json implies ---

@pytest.fixture
def family_ckpt(tmp_path, checkpoints):
    """A writable copy of the tiny checkpoint of a family."""
    return lambda family: shutil.copytree(checkpoints[family], tmp_path / family)


def _edit_tensors(path, edit):
    """Rewrite model.safetensors with ``edit(dict of tensors)``'s result."""
    from safetensors.torch import load_file, save_file

    tensors = edit(load_file(path / "model.safetensors"))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _fuse_layer(tensors, prefix, gate, up, down, num_experts):
    """Replace a layer's per-expert tensors by transformers' fused [E, 2I, H] / [E, H, I] tensors."""
    per = lambda e, proj: tensors.pop(f"{prefix}.{e}.{proj}.weight")  # noqa: E731
    experts = range(num_experts)
    gate_up = [torch.cat([per(e, gate), per(e, up)]) for e in experts]
    tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
    tensors[f"{prefix}.down_proj"] = torch.stack([per(e, down) for e in experts])
    return tensors


def _fuse_mixtral_layer_1(tensors):
    return _fuse_layer(tensors, "model.layers.1.block_sparse_moe.experts", "w1", "w3", "w2", 8)


@pytest.mark.parametrize("family,name", [
    ("mixtral", "model.layers.1.block_sparse_moe.experts.1.w1.weight"),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.7.w3.weight"),
    ("mixtral", "model.layers.2.block_sparse_moe.experts.0.w2.weight"),
    ("qwen2_moe", "model.layers.2.mlp.experts.3.up_proj.weight"),
    ("qwen3_moe", "model.layers.1.mlp.experts.0.gate_proj.weight"),
    ("deepseek_v2", "model.layers.2.mlp.experts.5.down_proj.weight"),
    ("deepseek_v3", "model.layers.1.mlp.experts.2.up_proj.weight"),
    ("olmoe", "model.layers.0.mlp.experts.6.up_proj.weight"),
])
def test_missing_one_projection_names_it(family_ckpt, family, name):
    path = family_ckpt(family)
    _drop_tensors(path, lambda k: k == name)
    with pytest.raises(MoEOffloadError, match=re.escape(name)):
        load(path)


def test_fused_expert_tensors_load_like_per_expert(mixtral_dir, family_ckpt):
    path = family_ckpt("mixtral")
    _edit_tensors(path, _fuse_mixtral_layer_1)
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        want = load(mixtral_dir)(ids).logits
        got = load(path)(ids).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("missing", ["gate_up_proj", "down_proj"])
def test_missing_fused_projection_names_it(family_ckpt, missing):
    path = family_ckpt("mixtral")
    name = f"model.layers.1.block_sparse_moe.experts.{missing}"
    _edit_tensors(path, lambda t: {k: v for k, v in _fuse_mixtral_layer_1(t).items() if k != name})
    with pytest.raises(MoEOffloadError, match=re.escape(name)):
        load(path)


@pytest.mark.parametrize("family,name,shape,expected", [
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w1.weight", (24, 31), (24, 32)),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight", (24, 32), (32, 24)),
    ("qwen2_moe", "model.layers.0.mlp.experts.4.up_proj.weight", (25, 32), (24, 32)),
    ("deepseek_v3", "model.layers.2.mlp.experts.7.down_proj.weight", (32,), (32, 24)),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.gate_up_proj", (8, 48, 33), (8, 48, 32)),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.down_proj", (7, 32, 24), (8, 32, 24)),
    ("mixtral", "model.layers.1.self_attn.q_proj.weight", (32, 31), (32, 32)),
])
def test_wrong_shaped_tensor_names_it_and_both_shapes(family_ckpt, family, name, shape, expected):
    path = family_ckpt(family)

    def edit(tensors):
        if ".experts.gate_up_proj" in name or ".experts.down_proj" in name:
            tensors = _fuse_mixtral_layer_1(tensors)
        tensors[name] = torch.zeros(shape)
        return tensors

    _edit_tensors(path, edit)
    with pytest.raises(MoEOffloadError, match=re.escape(name)) as err:
        load(path)
    assert str(list(shape)) in str(err.value) and str(list(expected)) in str(err.value)


@pytest.mark.parametrize("name", [
    "model.layers.1.block_sparse_moe.experts.2.w2.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.block_sparse_moe.gate.weight",
])
def test_integer_weight_names_it(family_ckpt, name):
    path = family_ckpt("mixtral")

    def edit(tensors):
        tensors[name] = torch.ones_like(tensors[name], dtype=torch.int32)
        return tensors

    _edit_tensors(path, edit)
    with pytest.raises(MoEOffloadError, match=re.escape(name) + ".*dtype I32"):
        load(path)


@pytest.mark.parametrize("family,changes,field", [
    ("mixtral", {"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ("mixtral", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("mixtral", {"num_local_experts": 0}, "num_local_experts"),
    ("mixtral", {"hidden_size": 0}, "hidden_size"),
    ("mixtral", {"intermediate_size": -24}, "intermediate_size"),
    ("mixtral", {"num_hidden_layers": 0}, "num_hidden_layers"),
    ("qwen2_moe", {"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ("qwen2_moe", {"num_experts": 1, "num_experts_per_tok": 2}, "num_experts_per_tok"),
    ("qwen3_moe", {"num_experts_per_tok": -1}, "num_experts_per_tok"),
    ("olmoe", {"num_experts": 0}, "num_experts"),
    ("deepseek_v2", {"n_group": 3}, "n_group"),
    ("deepseek_v2", {"topk_group": 5}, "topk_group"),
    ("deepseek_v3", {"n_group": 3}, "n_group"),
    ("deepseek_v3", {"n_group": 0}, "n_group"),
    ("deepseek_v3", {"topk_group": 5}, "topk_group"),
    ("deepseek_v3", {"topk_group": 0}, "topk_group"),
    ("deepseek_v3", {"n_routed_experts": 0}, "n_routed_experts"),
    ("deepseek_v3", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("deepseek_v3", {"moe_intermediate_size": 0}, "moe_intermediate_size"),
])
def test_inconsistent_config_names_the_field(family_ckpt, family, changes, field):
    path = family_ckpt(family)
    config = json.loads((path / "config.json").read_text())
    config |= changes
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoEOffloadError, match=rf"\b{field}\b"):
        load(path)


def test_store_rejects_a_partly_written_expert():
    from moe_offload.transfer import ExpertShape

    store = HostExpertStore(1, 2, ExpertShape(hidden=4, intermediate=3), torch.float32, pin=False)
    store.write(0, "gate_up", torch.zeros(6, 4))
    store.write(0, "down", torch.zeros(4, 3))
    store.write(1, "gate", torch.zeros(3, 4))
    store.write(1, "down", torch.zeros(4, 3))
    assert store.missing_keys() == [1]
    store.write(1, "up", torch.zeros(3, 4))
    assert store.missing_keys() == []
