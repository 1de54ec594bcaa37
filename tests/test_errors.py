"""Bad input raises MoEOffloadError naming the problem and the fix; nothing stays loaded."""

from __future__ import annotations

import gc
import json
import shutil

import pytest
import torch
from tiny_checkpoints import make_checkpoint

import moe_offload
from moe_offload import MoEOffloadError
from moe_offload.transfer import HostExpertStore


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
    before = sum(isinstance(o, HostExpertStore) for o in gc.get_objects())
    try:
        load(ckpt)
    except MoEOffloadError as err:
        kept = err  # a caller holding on to the error must not hold the half-loaded store
    gc.collect()
    assert kept.__traceback__ is not None
    assert sum(isinstance(o, HostExpertStore) for o in gc.get_objects()) == before


def test_shape_mismatch(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["hidden_size"] = 48
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoEOffloadError, match="do not belong together"):
        load(ckpt)
