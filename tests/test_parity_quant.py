"""The law for quantized experts: logits equal transformers running the same dequantized weights.

The reference is a plain transformers model whose every routed expert's weights are replaced by
dequant(quant(w)) (``ExpertFormat.dequantized``), and, for the "-a8" formats, whose experts' matmul
inputs are rounded as those formats round them (``ExpertFormat.round_activations``); the offloaded model
stores, copies and computes the packed bytes, on the device path or on the CPU kernels.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import assert_close, layer_budgets, rel_err
from transformers import AutoModelForCausalLM

import moe_offload
from moe_offload.cpu_kernels.packed import ACT_QUANT, PACKED, ExpertFormat
from moe_offload.errors import MoEOffloadError

from tiny_checkpoints import FAMILIES

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))  # [B, S]
PROMPT = TOKENS[:1, :6]
GENERATE = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
_REFS: dict = {}


def experts_modules(model) -> list:
    """transformers' fused experts modules (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    return [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
            and m.gate_up_proj.dim() == 3]


def quantized_reference(path, fmt_name: str, dtype: torch.dtype = torch.float32):
    """transformers in ``dtype`` (eager experts) with every routed expert's weights replaced by
    dequant(quant(w)), w as the checkpoint stores it."""
    key = (path, fmt_name, dtype)
    if key not in _REFS:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()
        source = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            for module, stored in zip(experts_modules(model), experts_modules(source)):
                _, two_i, hidden = module.gate_up_proj.shape
                fmt = ExpertFormat(fmt_name, hidden, two_i // 2, dtype)
                for e in range(module.gate_up_proj.shape[0]):
                    module.gate_up_proj[e] = fmt.dequantized(stored.gate_up_proj[e], "gate_up")
                    module.down_proj[e] = fmt.dequantized(stored.down_proj[e], "down")
                if fmt.act_quant:
                    round_matmul_inputs(module, fmt)
        _REFS[key] = model
    return _REFS[key]


def round_matmul_inputs(module: torch.nn.Module, fmt: ExpertFormat) -> None:
    """transformers' own experts forward, with every F.linear it calls fed the input rounded as ``fmt`` rounds
    it (a pre-hook swaps torch.nn.functional.linear for the call's duration, the hook restores it)."""
    linear = torch.nn.functional.linear
    stack = contextlib.ExitStack()

    def rounded(x, weight, bias=None):
        return linear(fmt.round_activations(x), weight, bias)

    def swap(*_):
        stack.enter_context(_patched(torch.nn.functional, "linear", rounded))

    module.register_forward_pre_hook(swap)
    module.register_forward_hook(lambda *_: stack.close())


@contextlib.contextmanager
def _patched(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def load(path, fmt_name: str, dtype=torch.float32, **fields):
    return moe_offload.from_pretrained(path, device="cpu", dtype=dtype, expert_dtype=fmt_name, progress=False,
                                       **fields)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("fmt_name", PACKED)
@pytest.mark.parametrize(("family", "slots"), layer_budgets(["mixtral", "deepseek_v3"], everything=True))
def test_quantized_logits_match_dequantized_transformers(checkpoints, family, slots, fmt_name):
    path = checkpoints[family]
    model = load(path, fmt_name, expert_slots=slots)
    assert model.offload.store.format.name == fmt_name
    with torch.no_grad():
        got = model(TOKENS).logits
        expected = quantized_reference(path, fmt_name)(TOKENS).logits
    assert_close(got, expected, f"{family} {fmt_name} with {slots} slots")


@pytest.mark.parametrize("fmt_name", PACKED)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("mixtral", "deepseek_v3")])
def test_every_family_quantized(checkpoints, family, fmt_name):
    path = checkpoints[family]
    with torch.no_grad():
        got = load(path, fmt_name, expert_slots=3)(TOKENS).logits
        expected = quantized_reference(path, fmt_name)(TOKENS).logits
    assert_close(got, expected, f"{family} {fmt_name}")


@pytest.mark.parametrize("fmt_name", PACKED)
def test_quantized_greedy_generation_and_cpu_experts(checkpoints, fmt_name):
    """Greedy ids equal the reference's, with misses copied and with every miss on the CPU runner."""
    path = checkpoints["qwen3_moe"]
    expected = quantized_reference(path, fmt_name).generate(PROMPT, **GENERATE)
    for mode in ("never", "always"):
        model = load(path, fmt_name, expert_slots=2, cpu_experts=mode)
        assert torch.equal(model.generate(PROMPT, **GENERATE), expected), f"{fmt_name} cpu_experts={mode}"
        if mode == "always":
            assert model.offload.stats.cpu_experts.sum() > 0
        model.offload.close()


@pytest.mark.parametrize("fmt_name", ["int4", "fp8", "int4-a8", "int8-a8"])
def test_quantized_under_late_copies(checkpoints, fmt_name):
    """Packed bytes copied late and out of order (the deferred backend) still give the reference's logits."""
    path = checkpoints["deepseek_v3"]
    model = load(path, fmt_name, expert_slots=2, copy_backend="deferred", copy_seed=5)
    with torch.no_grad():
        assert_close(model(TOKENS).logits, quantized_reference(path, fmt_name)(TOKENS).logits,
                     f"deepseek_v3 {fmt_name} deferred copies")


@pytest.mark.parametrize("fmt_name", ACT_QUANT)
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("mode", ["never", "always", "auto"])
@pytest.mark.parametrize("copy_backend", ["immediate", "deferred"])
def test_activation_rounding_wherever_experts_run(checkpoints, family, fmt_name, mode, copy_backend, split_profile):
    """An "-a8" expert computes the same function on the device path (fake-quantized activations, dequantized
    weights) and on the CPU kernels (integer dot products): logits equal the reference in every mode."""
    path = checkpoints[family]
    model = load(path, fmt_name, expert_slots=2, cpu_experts=mode, hardware=str(split_profile),
                 copy_backend=copy_backend, copy_seed=3)
    with torch.no_grad():
        assert_close(model(TOKENS).logits, quantized_reference(path, fmt_name)(TOKENS).logits,
                     f"{family} {fmt_name} cpu_experts={mode} {copy_backend}")
    cpu_runs = int(model.offload.stats.cpu_experts.sum())
    assert (cpu_runs == 0) if mode == "never" else (cpu_runs > 0), mode
    model.offload.close()


def test_activation_rounding_matters(checkpoints):
    """Control: an "-a8" model is measurably far from its weight-only twin's reference, so the parity above
    checks the rounding."""
    path = checkpoints["mixtral"]
    with torch.no_grad():
        got = load(path, "int8-a8", expert_slots=3)(TOKENS).logits
        rounded = rel_err(got, quantized_reference(path, "int8-a8")(TOKENS).logits)
        assert rel_err(got, quantized_reference(path, "int8")(TOKENS).logits) > 100 * rounded


@pytest.mark.parametrize("fmt_name", ["int4", "int4-a8"])
def test_quantized_bfloat16(checkpoints, fmt_name):
    path = checkpoints["mixtral"]
    model = load(path, fmt_name, dtype=torch.bfloat16, expert_slots=3)
    with torch.no_grad():
        got = model(TOKENS).logits
        expected = quantized_reference(path, fmt_name, torch.bfloat16)(TOKENS).logits
    assert_close(got, expected, f"mixtral {fmt_name} in bf16")


def test_reference_swap_matters(checkpoints):
    """Control: int4 logits are measurably far from the unquantized model's, so the parity above checks the
    dequantized weights, not a tolerance loose enough to hide quantization."""
    path = checkpoints["mixtral"]
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        got = load(path, "int4", expert_slots=3)(TOKENS).logits
        assert rel_err(got, plain(TOKENS).logits) > 100 * rel_err(got, quantized_reference(path, "int4")(TOKENS).logits)


def test_packed_bytes_everywhere(checkpoints):
    """The store, the slots, the memory plan and the copied bytes count packed bytes, scales included."""
    path = checkpoints["mixtral"]
    native = load(path, None, expert_slots=4)
    for fmt_name in PACKED:
        model = load(path, fmt_name, expert_slots=4)
        fmt = model.offload.store.format
        assert model.offload.store.bytes_per_expert == fmt.nbytes == model.offload.plan.bytes_per_expert
        assert model.offload.store.blocks.shape[1] * model.offload.store.blocks.element_size() == fmt.nbytes
        assert fmt.nbytes < native.offload.store.bytes_per_expert
        with torch.no_grad():
            model(TOKENS)
        stats = model.offload.stats
        assert stats.bytes_copied.sum() == stats.copies.sum() * fmt.nbytes > 0


def test_unknown_expert_dtype(checkpoints):
    with pytest.raises(MoEOffloadError, match="unknown expert_dtype 'int3'.*int4"):
        load(checkpoints["mixtral"], "int3")


def test_quantize_once_cache(checkpoints, tmp_path):
    """The first load writes the packed experts; a later load reads them (same bytes, no quantization); a
    corrupt or stale file is detected, never used, and rebuilt."""
    from moe_offload.loading import quant_cache

    path = checkpoints["olmoe"]
    first = load(path, "int4", expert_slots=3, quant_cache=str(tmp_path))
    files = list(tmp_path.glob("experts-int4-*.safetensors"))
    assert len(files) == 1
    calls = []
    real = quant_cache.load_cached

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    quant_cache.load_cached = spy
    try:
        second = load(path, "int4", expert_slots=3, quant_cache=str(tmp_path))
        assert calls == [True] and torch.equal(second.offload.store.blocks, first.offload.store.blocks)
        raw = bytearray(files[0].read_bytes())
        raw[-5] ^= 0xFF                                    # one flipped byte in the last expert
        files[0].write_bytes(bytes(raw))
        with pytest.warns(UserWarning, match="stale or corrupt.*checksum"):
            third = load(path, "int4", expert_slots=3, quant_cache=str(tmp_path))
        assert calls[-1] is False and torch.equal(third.offload.store.blocks, first.offload.store.blocks)
        load(path, "int4", expert_slots=3, quant_cache=str(tmp_path))
        assert calls[-1] is True, "the rebuilt file is used again"
        files[0].write_bytes(files[0].read_bytes()[:100])   # truncated
        with pytest.warns(UserWarning, match="stale or corrupt"):
            load(path, "int4", expert_slots=3, quant_cache=str(tmp_path))
        assert calls[-1] is False
    finally:
        quant_cache.load_cached = real
    other = load(path, "int8", expert_slots=3, quant_cache=str(tmp_path))
    assert other.offload.store.format.name == "int8" and len(list(tmp_path.glob("experts-*"))) == 2
    with torch.no_grad():
        assert_close(third(TOKENS).logits, quantized_reference(path, "int4")(TOKENS).logits, "olmoe int4 from cache")


def test_cache_key_follows_the_checkpoint(tmp_path):
    """Re-saving the checkpoint with other weights changes the key: the old file is stale."""
    from tiny_checkpoints import make_checkpoint

    path = make_checkpoint("mixtral", tmp_path / "ckpt", seed=1)
    load(path, "int8", expert_slots=2, quant_cache=str(tmp_path / "c"))
    make_checkpoint("mixtral", path, seed=2)
    model = load(path, "int8", expert_slots=2, quant_cache=str(tmp_path / "c"))
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2
    with torch.no_grad():
        assert_close(model(TOKENS).logits, quantized_reference(path, "int8")(TOKENS).logits, "re-saved mixtral int8")
