"""GPTQ, AWQ (GEMM) and compressed-tensors pack-quantized int4 checkpoints: routed experts repacked into the
int4 format without re-quantization, dense weights dequantized on read; logits equal transformers running
the checkpoint's own dequantized weights (tests/int4_checkpoints.py) at every budget, under late copies, on
the CPU kernels and from the disk tier; bad input refused by name before anything is computed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_close
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_offload
from moe_offload import MoEOffloadError
from moe_offload.cli import main
from moe_offload.loading.checkpoint import Checkpoint

from int4_checkpoints import (
    awq_pack,
    dequantized_int4_checkpoint,
    gptq_pack,
    int4_overrides,
    make_int4_checkpoint,
    reference_dequantize,
)
from tiny_checkpoints import FAMILIES, make_checkpoint, num_experts

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))  # [B, S]
PROMPT = TOKENS[:1, :6]
GENERATE = {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 8, "pad_token_id": 0}

# (method, make_int4_checkpoint fields, the expert format that holds it exactly)
FORMATS = {
    "gptq-g32": ("gptq", dict(group=32), "int4-g32"),
    "gptq_v2-g64": ("gptq", dict(group=64, v1=False), "int4"),
    "gptq-channel": ("gptq", dict(group=None), "int4-g128"),
    "awq-g32": ("awq", dict(group=32), "int4-g32"),
    "awq-g128": ("awq", dict(group=128), "int4-g128"),
    "ct-g32-sym": ("compressed-tensors", dict(group=32, symmetric=True), "int4-g32"),
    "ct-g32-asym": ("compressed-tensors", dict(group=32, symmetric=False), "int4-g32"),
    "ct-channel-asym": ("compressed-tensors", dict(group=None, symmetric=False), "int4-g128"),
}
# Every family under each method, every format on one family.
CASES = sorted({f"{family}/{fmt}" for family in FAMILIES for fmt in ("gptq-g32", "awq-g32", "ct-g32-asym")}
               | {f"qwen3_moe/{fmt}" for fmt in FORMATS})
_REFS: dict = {}


class Reference:
    """One int4 checkpoint and transformers' model on its reference dequantization, with its logits."""

    def __init__(self, root, family: str, fmt: str):
        method, fields, self.expert_format = FORMATS[fmt]
        self.family = family
        source = make_checkpoint(family, root / "source", **int4_overrides(family))
        self.path = make_int4_checkpoint(source, root / "int4", method, **fields)
        self.plain = dequantized_int4_checkpoint(self.path, root / "plain")
        self.model = AutoModelForCausalLM.from_pretrained(self.plain, dtype=torch.float32).eval()
        with torch.no_grad():
            self.logits = self.model(TOKENS).logits


@pytest.fixture
def case(request, tmp_path_factory) -> Reference:
    if request.param not in _REFS:
        family, fmt = request.param.split("/")
        _REFS[request.param] = Reference(tmp_path_factory.mktemp(fmt), family, fmt)
    return _REFS[request.param]


def load(path, **fields):
    return moe_offload.from_pretrained(path, **({"device": "cpu", "dtype": torch.float32, "progress": False} | fields))


def budgets(family: str) -> list:
    e = num_experts(family)
    return [1, e // 2, None]


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_logits_equal_reference_at_every_budget(case):
    for slots in budgets(case.family):
        model = load(case.path, expert_slots=slots)
        assert model.offload.store.format.name == case.expert_format
        with torch.no_grad():
            assert_close(model(TOKENS).logits, case.logits, f"{case.family} {case.path.parent.name} {slots} slots")


@pytest.mark.parametrize("case", ["mixtral/gptq-g32", "deepseek_v2/awq-g32", "qwen2_moe/ct-g32-asym",
                                  "qwen3_moe/ct-channel-asym"], indirect=True)
@pytest.mark.parametrize("fields", [
    dict(copy_backend="deferred", copy_seed=3, expert_slots=2, predictor="previous", prefetch_depth=2),
    dict(copy_backend="deferred", copy_seed=7, expert_slots=3),
    dict(cpu_experts="always", expert_slots=1),
], ids=["deferred-prefetch", "deferred", "cpu-always"])
def test_late_copies_and_cpu_experts(case, fields):
    model = load(case.path, **fields)
    with torch.no_grad():
        assert_close(model(TOKENS).logits, case.logits, f"{case.family} {fields}")
    if fields.get("cpu_experts") == "always":
        assert model.offload.stats.cpu_experts.sum() > 0


@pytest.mark.parametrize("case", ["olmoe/gptq-g32", "qwen3_moe/awq-g128", "mixtral/ct-g32-asym"], indirect=True)
def test_disk_tier(case, tmp_path):
    full = load(case.path, expert_slots=2)
    rows = full.offload.plan.experts_per_layer
    model = load(case.path, expert_slots=2, host_memory=rows * full.offload.plan.bytes_per_expert,
                 quant_cache=str(tmp_path))
    assert model.offload.plan.disk_tier
    with torch.no_grad():
        assert_close(model(TOKENS).logits, case.logits, f"{case.family} from disk")
    assert model.offload.stats.disk_reads.sum() > 0
    assert torch.equal(model.generate(PROMPT, **GENERATE), case.model.generate(PROMPT, **GENERATE))


@pytest.mark.parametrize("case", ["qwen3_moe/gptq-g32", "qwen3_moe/ct-g32-sym"], indirect=True)
def test_experts_are_the_checkpoints_weights_exactly(case):
    """Every stored expert dequantizes to the reference's weights bit for bit (no re-quantization)."""
    model = load(case.path)
    store, reference = model.offload.store, reference_dequantize(case.path)
    fmt = store.format
    layer = model.offload.moe_layers[0]
    base = f"model.layers.{layer}.mlp.experts"
    for e in range(store.num_experts):
        gate_up, down = fmt.unpack(store.blocks[store.key(0, e)])
        expected = torch.cat([reference[f"{base}.{e}.gate_proj.weight"], reference[f"{base}.{e}.up_proj.weight"]])
        assert torch.equal(gate_up, expected)
        assert torch.equal(down, reference[f"{base}.{e}.down_proj.weight"])


@pytest.mark.parametrize("pack", ["gptq-v1", "gptq-v2", "awq"])
def test_decoding_covers_every_code_and_zero(tmp_path, pack):
    """Random codes and zeros over the whole 0..15 range (GPTQ v1's zero 0 borrows across nibbles) decode to
    the reference formula's weights."""
    gen = torch.Generator().manual_seed(0)
    n, k, group = 24, 64, 32
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zero = torch.randint(0, 16, (n, k // group), generator=gen)
    zero[:, 0] = 0
    scale = (torch.rand(n, k // group, generator=gen) + 0.01).half()
    v1 = pack == "gptq-v1"
    tensors = gptq_pack(codes, scale, zero, group, v1) if pack != "awq" else awq_pack(codes, scale, zero)
    (tmp_path / "c").mkdir()
    source = make_checkpoint("olmoe", tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    method = "awq" if pack == "awq" else "gptq"
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": group,
                                     "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    save_file({f"x.{s}": t for s, t in tensors.items()}, tmp_path / "c" / "model.safetensors")
    checkpoint = Checkpoint(tmp_path / "c")
    expected = reference_dequantize(tmp_path / "c")["x.weight"]
    assert torch.equal(checkpoint.get("x.weight"), expected)
    assert torch.equal(expected, (codes - zero.repeat_interleave(group, 1)) * scale.float().repeat_interleave(group, 1))


@pytest.mark.parametrize("case", ["qwen3_moe/gptq-g32", "qwen3_moe/ct-channel-asym"], indirect=True)
def test_info_shows_format_and_expert_bytes(case, capsys):
    assert main(["info", "--model", str(case.path)]) == 0
    out = capsys.readouterr().out
    method = "gptq" if "gptq" in str(case.path.parent) else "compressed-tensors"
    assert f"{method} int4" in out
    assert case.expert_format in out and "bytes per expert" in out
    assert "int4 weights repacked, not re-quantized" in out


def test_expert_dtype_explicit_dequantizes(tmp_path):
    """--expert-dtype float32 keeps the experts dequantized: the reference's weights, read as floats."""
    case = _REFS.get("mixtral/gptq-g32") or Reference(tmp_path, "mixtral", "gptq-g32")
    model = load(case.path, expert_dtype="float32", expert_slots=2)
    assert model.offload.store.format.name == "float32"
    with torch.no_grad():
        assert_close(model(TOKENS).logits, case.logits, "gptq experts as float32")


# --- bad input: refused by name, before anything is computed ----------------------------------------------------------

@pytest.fixture(scope="module")
def gptq(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    source = make_checkpoint("qwen3_moe", root / "source", **int4_overrides("qwen3_moe"))
    return make_int4_checkpoint(source, root / "gptq", "gptq", group=32)


def _edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] |= fields
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


EXPERT = "model.layers.1.mlp.experts.0.down_proj"
GATE = "model.layers.1.mlp.experts.0.gate_proj"     # K = 64: two groups of 32
BAD_CONFIG = {
    "3 bits": (dict(bits=3), r"quantization_config bits = 3 is not read"),
    "8 bits": (dict(bits=8), r"quantization_config bits = 8 is not read"),
    "desc_act": (dict(desc_act=True), r"desc_act = true .*not read"),
    "dynamic": (dict(dynamic={r"+:.*down_proj": {"bits": 8}}), r"quantization_config dynamic is set"),
    "group 48": (dict(group_size=48), r"group_size = 48 is not read"),
    "marlin": (dict(checkpoint_format="marlin"), r"checkpoint_format = 'marlin' is not read"),
    "awq gemv": (dict(quant_method="awq", version="gemv"), r"version = 'gemv' is not read"),
    "ct float": (dict(quant_method="compressed-tensors", format="float-quantized",
                      config_groups={"g": {"weights": {"num_bits": 8, "type": "float"}}}),
                 r"config_groups.g.format = 'float-quantized' is not read"),
    "ct 8 bits": (dict(quant_method="compressed-tensors", format="pack-quantized",
                       config_groups={"g": {"weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}),
                  r"config_groups.g.weights.num_bits = 8 is not read"),
    "ct w4a8": (dict(quant_method="compressed-tensors", format="pack-quantized",
                     config_groups={"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                      "group_size": 32}, "input_activations": {"num_bits": 8}}}),
                r"config_groups.g.input_activations is set"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIG))
def test_bad_config_refused_by_field(gptq, tmp_path, name):
    fields, message = BAD_CONFIG[name]
    path = shutil.copytree(gptq, tmp_path / "c")
    _edit_config(path, **fields)
    with pytest.raises(MoEOffloadError, match=message):
        load(path)
    assert main(["info", "--model", str(path)]) == 2


BAD_TENSORS = {
    "missing qzeros": (lambda t: t.pop(f"{EXPERT}.qzeros"), rf"{EXPERT}.qzeros is missing"),
    "missing scales": (lambda t: t.pop(f"{EXPERT}.scales"), rf"{EXPERT}.scales is missing"),
    "qzeros shape": (lambda t: t.__setitem__(f"{EXPERT}.qzeros", t[f"{EXPERT}.qzeros"][:, :1].clone()),
                     rf"{EXPERT}.qzeros has shape \[1, 1\]"),
    "scales dtype": (lambda t: t.__setitem__(f"{EXPERT}.scales", t[f"{EXPERT}.scales"].to(torch.int32)),
                     rf"{EXPERT}.scales is I32"),
    "act-order g_idx": (lambda t: t.__setitem__(f"{GATE}.g_idx", t[f"{GATE}.g_idx"].flip(0).contiguous()),
                        rf"{GATE}.g_idx is not k // group_size"),
    "orphan scales": (lambda t: t.pop(f"{EXPERT}.qweight"), rf"tensor {EXPERT}.\w+ has no {EXPERT}.qweight"),
}


@pytest.mark.parametrize("name", list(BAD_TENSORS))
def test_bad_tensors_refused_by_name(gptq, tmp_path, name):
    edit, message = BAD_TENSORS[name]
    path = shutil.copytree(gptq, tmp_path / "c")
    _edit_tensors(path, edit)
    with pytest.raises(MoEOffloadError, match=message):
        load(path)
    assert main(["run", "a", "--model", str(path), "--device", "cpu", "--max-new-tokens", "1"]) == 2


def test_scales_not_float16_refused_by_name(gptq, tmp_path):
    path = shutil.copytree(gptq, tmp_path / "c")
    _edit_tensors(path, lambda t: t.__setitem__(f"{EXPERT}.scales", t[f"{EXPERT}.scales"].float() * (1 + 2**-20)))
    with pytest.raises(MoEOffloadError, match=rf"{EXPERT}.weight: .*not all exactly float16"):
        load(path)


@pytest.mark.parametrize("case", ["qwen3_moe/awq-g128"], indirect=True)
def test_bfloat16_compute(case):
    """In bfloat16 every weight is the exact dequantized value rounded once, as transformers rounds the
    reference's float32 weights."""
    model = load(case.path, dtype=torch.bfloat16, expert_slots=3)
    reference = AutoModelForCausalLM.from_pretrained(case.plain, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert_close(model(TOKENS).logits, reference(TOKENS).logits, "awq in bfloat16")


@pytest.mark.parametrize("case", ["qwen3_moe/ct-g32-asym"], indirect=True)
def test_bfloat16_scales_kept_exactly(case, tmp_path):
    """compressed-tensors releases of bf16 models carry bfloat16 scales: float16 holds them exactly (in its
    normal range), so the experts stay int4 and equal the reference."""
    path = shutil.copytree(case.path, tmp_path / "bf16")
    _edit_tensors(path, lambda t: t.update({n: v.bfloat16() for n, v in t.items() if n.endswith("weight_scale")}))
    reference = AutoModelForCausalLM.from_pretrained(dequantized_int4_checkpoint(path, tmp_path / "plain"),
                                                     dtype=torch.float32).eval()
    model = load(path, expert_slots=3)
    assert model.offload.store.format.name == "int4-g32"
    with torch.no_grad():
        assert_close(model(TOKENS).logits, reference(TOKENS).logits, "bf16 scales")
