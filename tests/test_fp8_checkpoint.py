"""Block-FP8 checkpoints (DeepSeek-V3's format) load dequantized, and their logits and generations equal
transformers running the dequantized weights; every other quantized checkpoint (but int4:
test_int4_checkpoint.py) is refused by name."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import assert_close, rel_err
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_offload
from moe_offload import MoEOffloadError
from moe_offload.cli import main
from moe_offload.loading.checkpoint import Checkpoint

from tiny_checkpoints import dequantize_fp8, dequantized_checkpoint, make_checkpoint, make_fp8_checkpoint

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))  # [B, S]
PROMPT = TOKENS[:1, :6]
GENERATE = {"max_new_tokens": 10, "do_sample": False, "min_new_tokens": 10, "pad_token_id": 0}

# (family, (BO, BI), fused experts on disk, modules_to_not_convert): 128x128 blocks are larger than every
# tiny dimension (one partial block per matrix); 8x16 blocks cut the fused gate_up rows across gate and up.
CASES = {
    "deepseek_v3-16x16": ("deepseek_v3", (16, 16), False, ()),
    "deepseek_v3-128x128": ("deepseek_v3", (128, 128), False, ()),
    "deepseek_v3-8x16-fused": ("deepseek_v3", (8, 16), True, ()),
    "qwen3_moe-16x16-skip": ("qwen3_moe", (16, 16), False, ("self_attn.o_proj",)),
}
_REFS: dict = {}


class Reference:
    """One FP8 checkpoint, and transformers' model on its dequantized weights with its logits and generation."""

    def __init__(self, root, family, block, fused, skip):
        source = make_checkpoint(family, root / "source")
        self.path = make_fp8_checkpoint(source, root / "fp8", block=block, fused=fused, skip=skip)
        self.model = AutoModelForCausalLM.from_pretrained(dequantized_checkpoint(self.path, root / "plain"),
                                                          dtype=torch.float32).eval()
        with torch.no_grad():
            self.logits = self.model(TOKENS).logits
        self._generated = None

    @property
    def generated(self) -> torch.Tensor:
        if self._generated is None:
            self._generated = self.model.generate(PROMPT, **GENERATE)
        return self._generated


@pytest.fixture
def case(request, tmp_path_factory) -> Reference:
    if request.param not in _REFS:
        _REFS[request.param] = Reference(tmp_path_factory.mktemp(request.param), *CASES[request.param])
    return _REFS[request.param]


def load(path, **fields):
    return moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False, **fields)


@pytest.mark.parametrize("case", list(CASES), indirect=True)
@pytest.mark.parametrize("slots", [2, None], ids=["2slots", "all"])
def test_logits_equal_transformers_on_dequantized_weights(case, slots):
    model = load(case.path, expert_slots=slots)
    with torch.no_grad():
        got = model(TOKENS).logits
    assert_close(got, case.logits, f"{case.path.parent.name} with {slots} slots")
    tensors = [*model.parameters(), *model.buffers(), model.offload.store.block(0)]
    assert not [t.dtype for t in tensors if t.dtype == torch.float8_e4m3fn], "fp8 bytes reached the model"
    assert getattr(model.config, "quantization_config", None) is None, "the loaded model is not quantized"
    if slots is not None:
        assert model.offload.stats.evictions.sum() > 0, "a budget below the expert count must evict"


@pytest.mark.parametrize("case", ["deepseek_v3-16x16", "qwen3_moe-16x16-skip"], indirect=True)
@pytest.mark.parametrize("slots", [2, None], ids=["2slots", "all"])
def test_greedy_generation_identical(case, slots):
    got = load(case.path, expert_slots=slots).generate(PROMPT, **GENERATE)
    assert torch.equal(got, case.generated), f"{case.path.parent.name} with {slots} slots"


@pytest.mark.parametrize("case", ["deepseek_v3-16x16"], indirect=True)
def test_scales_matter(case, tmp_path):
    """Negative control: a reader that casts the fp8 bytes and ignores the scales (what the loader did before
    it knew the format) is far from transformers on the dequantized weights, while this loader is not."""
    ignored = AutoModelForCausalLM.from_pretrained(dequantized_checkpoint(case.path, tmp_path, scales=False),
                                                   dtype=torch.float32).eval()
    with torch.no_grad():
        unscaled, got = ignored(TOKENS).logits, load(case.path, expert_slots=2)(TOKENS).logits
    assert rel_err(unscaled, case.logits) > 0.5, "these weights must make ignoring the scales visible"
    assert rel_err(got, case.logits) < 1e-5


@pytest.mark.parametrize("case", ["deepseek_v3-8x16-fused"], indirect=True)
def test_checkpoint_reads_fp8_weights_and_slices(case):
    """get / get_slice dequantize with the matching scales; fp8_weight gives the stored bytes; the scales are
    no model tensors."""
    ckpt = Checkpoint(case.path)
    stored = load_file(case.path / "model.safetensors")
    name = "model.layers.1.mlp.experts.gate_up_proj"     # [E, 2I, H] = [8, 48, 32], scales [8, 6, 2]
    q, scale_inv, block = ckpt.fp8_weight(name)
    assert (q.dtype, scale_inv.dtype, tuple(scale_inv.shape), block) == (torch.float8_e4m3fn, torch.float32,
                                                                         (8, 6, 2), (8, 16))
    expected = dequantize_fp8(stored[name], stored[name + "_scale_inv"], block)
    assert torch.equal(ckpt.get(name), expected)
    assert torch.equal(ckpt.get_slice(name, 5), expected[5])
    assert torch.equal(ckpt.fp8_weight_slice(name, 5).q.view(torch.uint8), stored[name][5].view(torch.uint8))
    row = "model.layers.1.self_attn.q_b_proj.weight"     # [64, 24]: a matrix, 8x16 blocks
    assert torch.equal(ckpt.get_slice(row, 13), dequantize_fp8(stored[row], stored[row + "_scale_inv"], block)[13])
    with pytest.raises(KeyError, match="not a fused"):
        ckpt.fp8_weight_slice(row, 13)
    assert not [n for n in ckpt.tensors if n.endswith("_scale_inv")]
    assert ckpt.tensors["model.embed_tokens.weight"].dtype == "F32"


def test_bfloat16_config_computes_in_bfloat16(tmp_path):
    """Unquantized tensors in bf16 and config dtype bf16, as DeepSeek-V3 ships: the model computes in bf16
    and equals transformers' eager bf16 on the dequantized weights."""
    source = make_checkpoint("qwen3_moe", tmp_path / "source")
    path = make_fp8_checkpoint(source, tmp_path / "fp8", dtype="bfloat16")
    reference = AutoModelForCausalLM.from_pretrained(dequantized_checkpoint(path, tmp_path / "plain"),
                                                     dtype=torch.bfloat16, experts_implementation="eager").eval()
    model = moe_offload.from_pretrained(path, device="cpu", expert_slots=3, progress=False)
    assert model.offload.store.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert_close(model(TOKENS).logits, reference(TOKENS).logits, "qwen3_moe fp8 in bf16")


@pytest.mark.parametrize("case", ["deepseek_v3-16x16", "deepseek_v3-128x128"], indirect=True)
def test_info_shows_checkpoint_format(case, capsys):
    assert main(["info", "--model", str(case.path), "--expert-slots", "2"]) == 0
    block = json.loads((case.path / "config.json").read_text())["quantization_config"]["weight_block_size"]
    out = capsys.readouterr().out
    line = f"checkpoint format +fp8 e4m3, {block[0]}x{block[1]} blocks \\(dense weights dequantized to torch.float32 on"
    assert re.search(line, out)
    kept = "fp8" if block == [128, 128] else "float32"     # 128x128 expert blocks are kept as stored
    assert re.search(f"expert format +{kept}", out)


# --- refusals: every quantization but block FP8 and int4 (test_int4_checkpoint.py), by name, on inspection ---

@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("plain") / "qwen3_moe")


@pytest.fixture(scope="module")
def fp8(tmp_path_factory, plain):
    return make_fp8_checkpoint(plain, tmp_path_factory.mktemp("fp8") / "qwen3_moe")


def edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | fields))


REFUSED = {
    "gptq-8bit": ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits = 8 is not read"),
    "awq-gemv": ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version = 'gemv' is not read"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' is not supported"),
    "compressed-tensors": ({"quant_method": "compressed-tensors", "format": "float-quantized"},
                           "config_groups is missing or empty"),
    "fp8-per-tensor": ({"quant_method": "fp8", "weight_block_size": None}, "'fp8' with a per-tensor scale"),
    "fp8-static": ({"quant_method": "fp8", "activation_scheme": "static"}, "'fp8' with activation_scheme 'static'"),
    "fp8-e5m2": ({"quant_method": "fp8", "fmt": "e5m2"}, "'fp8' with fmt 'e5m2'"),
    "fp8-ue8m0": ({"quant_method": "fp8", "scale_fmt": "ue8m0"}, "'fp8' with scale_fmt 'ue8m0'"),
    "unknown": ({"quant_method": "mystery"}, "'mystery' is not supported"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_other_quantization_refused_by_name(plain, tmp_path, name):
    quantization_config, message = REFUSED[name]
    path = shutil.copytree(plain, tmp_path / name)
    edit_config(path, quantization_config=quantization_config)
    with pytest.raises(MoEOffloadError, match=r"quantization_config .*(block-FP8|unquantized)") as err:
        load(path)
    assert message in str(err.value)


def test_info_refuses_config_only_gptq(plain, tmp_path):
    path = tmp_path / "config-only"
    path.mkdir()
    shutil.copy(plain / "config.json", path)
    edit_config(path, quantization_config=REFUSED["gptq-8bit"][0])
    assert main(["info", "--model", str(path)]) == 2


def test_float8_tensor_without_quantization_config_refused(fp8, tmp_path):
    path = shutil.copytree(fp8, tmp_path / "no-config")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoEOffloadError, match=r"tensor model\.layers\.\d+\..*\.weight is F8_E4M3 but config.json "
                                              r"has no quantization_config"):
        load(path)


def _edit_tensors(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    save_file(edit(tensors), path / "model.safetensors", metadata={"format": "pt"})


SCALE = "model.layers.1.self_attn.q_proj.weight_scale_inv"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: {k: v for k, v in t.items() if k != SCALE}, "q_proj.weight is F8_E4M3 but has no .*_scale_inv"),
    (lambda t: t | {SCALE: t[SCALE][:1]},
     r"has shape \[1, 2\] but weight shape \[32, 32\] with 16x16 blocks implies \[2, 2\]"),
    (lambda t: t | {SCALE: t[SCALE].double()}, "is F64; only float32 scales"),
    (lambda t: t | {SCALE.removesuffix("_scale_inv"): torch.zeros(32, 32)}, "which is F32, not F8_E4M3"),
], ids=["missing-scale", "scale-shape", "scale-dtype", "scale-without-fp8"])
def test_inconsistent_fp8_tensors_refused(fp8, tmp_path, edit, message):
    path = shutil.copytree(fp8, tmp_path / "bad")
    _edit_tensors(path, edit)
    with pytest.raises(MoEOffloadError, match=message):
        load(path)


def test_block_size_not_matching_the_scales_refused(fp8, tmp_path):
    path = shutil.copytree(fp8, tmp_path / "bad")
    edit_config(path, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(MoEOffloadError, match=r"128x128 blocks implies"):
        load(path)


def test_quantized_module_listed_unconverted_refused(fp8, tmp_path):
    path = shutil.copytree(fp8, tmp_path / "bad")
    edit_config(path, quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16],
                                           "modules_to_not_convert": ["o_proj"]})
    with pytest.raises(MoEOffloadError, match=r"o_proj\.weight_scale_inv exists but config.json lists its module "
                                              r"in modules_to_not_convert"):
        load(path)


def test_info_shows_unquantized_format(plain, capsys):
    assert main(["info", "--model", str(plain)]) == 0
    assert re.search(r"checkpoint format +unquantized\n", capsys.readouterr().out)


@pytest.mark.parametrize("case", ["deepseek_v3-128x128", "deepseek_v3-16x16"], indirect=True)
def test_fp8_experts_stay_fp8(case):
    """128x128 blocks (the real checkpoints'): the store keeps each expert's fp8 bytes and scales exactly as
    stored (1 byte per weight), no second rounding; other block sizes are dequantized on read."""
    from safetensors import safe_open

    model = load(case.path, expert_slots=2)
    store = model.offload.store
    if case.path.parent.name.startswith("deepseek_v3-16x16"):
        assert store.format.name == "float32"
        return
    assert store.format.name == "fp8" and store.bytes_per_expert < 3 * store.shape.numel // 2
    views = store.format.views(store.block(store.key(0, 1)))
    site = model.offload.moe_layers[0]
    name = f"model.layers.{site}.mlp.experts.1.down_proj.weight"
    with safe_open(str(case.path / "model.safetensors"), framework="pt") as f:
        assert torch.equal(views["down"], f.get_tensor(name).view(torch.uint8))
        assert torch.equal(views["down_scale"], f.get_tensor(name + "_scale_inv"))
