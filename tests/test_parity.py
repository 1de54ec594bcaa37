"""The law: offloaded logits and generations equal plain transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_offload

from tiny_checkpoints import FAMILIES, make_checkpoint, num_experts

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))  # [B, S]
_REFS: dict = {}


def reference(path):
    if path not in _REFS:
        _REFS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _REFS[path]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def slot_counts(family: str) -> list[int]:
    e = num_experts(family)
    return [1, e // 2, e]


def load(path, **fields):
    return moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False, **fields)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_at_every_budget(checkpoints, family):
    path = checkpoints[family]
    with torch.no_grad():
        expected = reference(path)(TOKENS).logits
    for k in slot_counts(family):
        model = load(path, expert_slots=k)
        with torch.no_grad():
            got = model(TOKENS).logits
        assert rel_err(got, expected) < 1e-5, f"{family} with {k} slots"
        stats = model.offload.stats
        assert stats.misses.sum() > 0
        if k < num_experts(family):
            assert stats.evictions.sum() > 0, "a budget below the expert count must evict"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_identical(checkpoints, family):
    path = checkpoints[family]
    prompt = TOKENS[:1, :6]
    kwargs = dict(max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    expected = reference(path).generate(prompt, **kwargs)
    for k in slot_counts(family):
        model = load(path, expert_slots=k)
        got = model.generate(prompt, **kwargs)
        assert torch.equal(got, expected), f"{family} with {k} slots"
        if k == num_experts(family) * model.offload.plan.num_moe_layers:
            assert model.offload.stats.hits.sum() > 0


def test_all_experts_resident_hits_after_first_pass(mixtral_dir):
    model = load(mixtral_dir)  # no budget: every expert gets a slot
    with torch.no_grad():
        model(TOKENS)
        misses = model.offload.stats.misses.sum()
        model(TOKENS)
    assert model.offload.stats.misses.sum() == misses, "a full cache never misses twice"
    assert model.offload.stats.hits.sum() > 0


def test_sharded_checkpoint(tmp_path):
    path = make_checkpoint("qwen2_moe", tmp_path / "sharded")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.save_pretrained(tmp_path / "shards", max_shard_size="60KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        expected = model.eval()(TOKENS).logits
        got = load(tmp_path / "shards", expert_slots=3)(TOKENS).logits
    assert rel_err(got, expected) < 1e-5


def test_fused_expert_tensors_on_disk(tmp_path):
    """Newer checkpoints store experts fused ([E, 2I, H] / [E, H, I]); both layouts load."""
    from safetensors.torch import load_file, save_file

    path = make_checkpoint("olmoe", tmp_path / "olmoe")
    tensors = load_file(path / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(3):
        p = f"model.layers.{layer}.mlp.experts"
        gate = torch.stack([tensors[f"{p}.{e}.gate_proj.weight"] for e in range(8)])
        up = torch.stack([tensors[f"{p}.{e}.up_proj.weight"] for e in range(8)])
        fused[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        fused[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(8)])
    save_file(fused, path / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        expected = reference(make_checkpoint("olmoe", tmp_path / "plain"))(TOKENS).logits
        got = load(path, expert_slots=2)(TOKENS).logits
    assert rel_err(got, expected) < 1e-5


def test_tied_embeddings(tmp_path):
    path = make_checkpoint("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    model = load(path, expert_slots=2)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        expected = reference(path)(TOKENS).logits
        got = model(TOKENS).logits
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_matches_bfloat16_transformers(checkpoints, family):
    """bf16: equal to transformers' eager experts, and no further from fp32 than its default kernel."""
    path = checkpoints[family]
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_implementation="eager").eval()
    default = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    model = moe_offload.from_pretrained(path, device="cpu", dtype="bf16", expert_slots=3, progress=False)
    assert model.offload.store.dtype == torch.bfloat16
    with torch.no_grad():
        got, exact = model(TOKENS).logits, reference(path)(TOKENS).logits
        assert rel_err(got, eager(TOKENS).logits) < 1e-3
        assert rel_err(got, exact) <= 1.1 * rel_err(default(TOKENS).logits, exact) + 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_cuda_logits_match(checkpoints, family):
    path = checkpoints[family]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().cuda()
    for k in slot_counts(family):
        model = moe_offload.from_pretrained(path, device="cuda", dtype=torch.float32, expert_slots=k, progress=False)
        assert model.offload.store.pinned
        with torch.no_grad():
            assert rel_err(model(TOKENS.cuda()).logits, ref(TOKENS.cuda()).logits) < 1e-5
