"""The law: offloaded logits and generations equal plain transformers'."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, layer_budgets, rel_err
from transformers import AutoModelForCausalLM

import moe_offload

from tiny_checkpoints import FAMILIES, make_checkpoint, num_experts

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))  # [B, S]
PROMPT = TOKENS[:1, :6]
GENERATE = dict(max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
_REFS: dict = {}
_LOGITS: dict = {}
_GENERATED: dict = {}


def reference(path):
    if path not in _REFS:
        _REFS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _REFS[path]


def reference_logits(path) -> torch.Tensor:
    if path not in _LOGITS:
        with torch.no_grad():
            _LOGITS[path] = reference(path)(TOKENS).logits
    return _LOGITS[path]


def reference_generation(path) -> torch.Tensor:
    if path not in _GENERATED:
        _GENERATED[path] = reference(path).generate(PROMPT, **GENERATE)
    return _GENERATED[path]


def load(path, **fields):
    return moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False, **fields)


@pytest.mark.parametrize(("family", "slots"), layer_budgets(FAMILIES, everything=True))
def test_logits_match_at_every_budget(checkpoints, family, slots):
    path = checkpoints[family]
    model = load(path, expert_slots=slots)
    with torch.no_grad():
        got = model(TOKENS).logits
    assert_close(got, reference_logits(path), f"{family} with {slots} slots")
    stats = model.offload.stats
    assert stats.misses.sum() > 0
    if slots is None:
        assert stats.evictions.sum() == 0, "with every expert given a slot nothing is evicted"
    elif slots < num_experts(family):
        assert stats.evictions.sum() > 0, "a budget below the expert count must evict"


@pytest.mark.parametrize(("family", "slots"), layer_budgets(FAMILIES, everything=True))
def test_greedy_generation_identical(checkpoints, family, slots):
    path = checkpoints[family]
    model = load(path, expert_slots=slots)
    got = model.generate(PROMPT, **GENERATE)
    assert torch.equal(got, reference_generation(path)), f"{family} with {slots} slots"
    if slots is None:   # every expert of every MoE layer has a slot: decode steps reuse the prompt's experts
        assert model.offload.plan.slots == num_experts(family) * model.offload.plan.num_moe_layers
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
    assert_close(got, expected, "qwen2_moe from shards")


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
    assert_close(got, expected, "olmoe with fused expert tensors")


def test_tied_embeddings(tmp_path):
    path = make_checkpoint("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    model = load(path, expert_slots=2)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        expected = reference(path)(TOKENS).logits
        got = model(TOKENS).logits
    assert_close(got, expected, "qwen3_moe with tied embeddings")


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
        assert_close(got, eager(TOKENS).logits, f"{family} bf16 vs transformers' eager bf16")
        assert rel_err(got, exact) <= 1.1 * rel_err(default(TOKENS).logits, exact) + 1e-3


_CUDA_LOGITS: dict = {}


@pytest.mark.cuda
@pytest.mark.parametrize(("family", "slots"), layer_budgets(["mixtral", "deepseek_v3"], everything=True))
def test_cuda_logits_match(checkpoints, family, slots):
    path = checkpoints[family]
    if path not in _CUDA_LOGITS:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().cuda()
        with torch.no_grad():
            _CUDA_LOGITS[path] = ref(TOKENS.cuda()).logits
    model = moe_offload.from_pretrained(path, device="cuda", dtype=torch.float32, expert_slots=slots, progress=False)
    assert model.offload.store.pinned
    with torch.no_grad():
        assert_close(model(TOKENS.cuda()).logits, _CUDA_LOGITS[path], f"{family} on CUDA with {slots} slots")


def test_extra_layers_past_the_model_are_ignored(tmp_path):
    """DeepSeek-V3 checkpoints also ship a multi-token-prediction layer (model.layers.<num_hidden_layers>.*,
    routed experts included) that transformers does not build: it is skipped, as transformers skips it."""
    from safetensors.torch import load_file, save_file

    path = make_checkpoint("deepseek_v3", tmp_path / "mtp")
    expected_model = reference(path)
    tensors = load_file(path / "model.safetensors")
    extra = {k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in tensors.items()
             if k.startswith("model.layers.2.")}
    extra["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
    assert any(".mlp.experts.0." in k for k in extra)
    save_file(tensors | extra, path / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        got = load(path, expert_slots=3)(TOKENS).logits
        assert_close(got, expected_model(TOKENS).logits, "deepseek_v3 with a multi-token-prediction layer on disk")
