"""GGUF checkpoints: the law for their experts kept in GGML blocks, and bad files refused by name.

The reference is transformers running the file's own dequantized weights (gguf_reference.py); the
offloaded model keeps the routed experts as the file stores them and dequantizes them on the device
path (torch ops into the engine's scratch) and on the CPU path (the runner's torch backend).
Files are tests/fixtures/gguf/*.gguf, made by llama.cpp's converter and quantizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close, rel_err

import moe_offload
from moe_offload.cpu_kernels.ggml_blocks import GGML_TYPES, TYPE_BY_NAME, dequantize
from moe_offload.cpu_kernels.ggml_dequant import dequantize_cpu
from moe_offload.errors import MoEOffloadError

gguf = pytest.importorskip("gguf")

from gguf_files import (FIXTURES, dense_model, random_blocks, random_expert_blocks, requantized_experts,  # noqa: E402
                        rewrite, stack_layers, stored, truncated)
from gguf_reference import gguf_reference  # noqa: E402

FILES = sorted(p.name for p in FIXTURES.glob("*.gguf"))
QUANTIZED = [f for f in FILES if not f.endswith(("-F32.gguf", "-F16.gguf"))]
TOKENS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))   # [B, S]
PROMPT = TOKENS[:1, :6]
GENERATE = dict(max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)
_REFS: dict = {}


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"fixture {name} is not in {FIXTURES}")
    return path


def reference(path: Path, dtype: torch.dtype = torch.float32):
    key = (str(path), dtype)
    if key not in _REFS:
        _REFS[key] = gguf_reference(path, dtype)
    return _REFS[key]


def load(path, dtype=torch.float32, **fields):
    return moe_offload.from_pretrained(path, device="cpu", dtype=dtype, progress=False, **fields)


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# -- the formats' dequantization ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [t.name for t in GGML_TYPES.values()])
def test_block_dequantization_equals_gguf(kind):
    """The torch dequantization (both paths run it) gives the gguf package's values bit for bit."""
    rng = np.random.default_rng(0)
    rows, cols = 5, 512
    raw = random_blocks(kind, rows, cols, rng)
    expected = gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType[kind])
    got = dequantize(torch.from_numpy(raw.copy()), TYPE_BY_NAME[kind], rows, cols)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expected.astype(np.float32)), kind
    # The CPU's Numba kernels (dense reads, the CPU runner's widening), also into a given buffer.
    cpu = dequantize_cpu(raw, TYPE_BY_NAME[kind], rows, cols)
    assert np.array_equal(cpu.numpy(), expected.astype(np.float32)), kind
    into = torch.full((2 * rows, cols), 7.0)
    dequantize_cpu(torch.from_numpy(raw.copy()), TYPE_BY_NAME[kind], rows, cols, out=into[rows:])
    assert np.array_equal(into[rows:].numpy(), expected.astype(np.float32)) and bool((into[:rows] == 7).all())


# -- parity ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("slots", [1, 2, None], ids=["1slot", "half", "all"])
def test_gguf_logits_match_dequantized_transformers(name, slots):
    path = fixture(name)
    model = load(path, expert_slots=slots)
    assert model.offload.store.format.name == "gguf"
    assert_close(logits(model), logits(reference(path)), f"{name} with {slots} slots")


@pytest.mark.parametrize("name", QUANTIZED)
def test_gguf_deferred_copies_and_cpu_experts(name):
    """Blocks copied late and out of order, and every miss run on the CPU runner, give the same logits."""
    path = fixture(name)
    expected = logits(reference(path))
    late = load(path, expert_slots=1, copy_backend="deferred", copy_seed=7)
    assert_close(logits(late), expected, f"{name} deferred copies")
    cpu = load(path, expert_slots=1, cpu_experts="always")
    assert_close(logits(cpu), expected, f"{name} cpu_experts=always")
    assert cpu.offload.stats.cpu_experts.sum() > 0


def test_gguf_greedy_generation(tmp_path):
    path = fixture("mixtral-Q4_K_M.gguf") if (FIXTURES / "mixtral-Q4_K_M.gguf").is_file() else fixture(QUANTIZED[0])
    expected = reference(path).generate(PROMPT, **GENERATE)
    for mode in ("never", "always"):
        model = load(path, expert_slots=1, cpu_experts=mode)
        assert torch.equal(model.generate(PROMPT, **GENERATE), expected), f"{path.name} cpu_experts={mode}"
        model.offload.close()


def _two_layers(tmp_path: Path) -> Path:
    """Mixtral with two MoE layers whose experts differ in type (llama.cpp's bytes for both; F16 experts
    are kept as stored too)."""
    names = [n for n in ("mixtral-Q4_K_M.gguf", "mixtral-Q8_0.gguf", "mixtral-Q4_0.gguf", "mixtral-F16.gguf")
             if (FIXTURES / n).is_file()]
    if len(names) < 2:
        pytest.skip("needs two quantized Mixtral fixtures")
    return stack_layers(FIXTURES / names[0], FIXTURES / names[1], tmp_path / "two-layers.gguf")


def test_gguf_per_layer_types_and_disk_tier(tmp_path):
    """Layers of different expert types share one row size; experts read from the GGUF on demand (the disk
    tier, a host cache of one layer's experts) give the same logits, deferred copies included."""
    path = _two_layers(tmp_path)
    expected = logits(reference(path))
    model = load(path, expert_slots=2)
    fmt = model.offload.store.format
    assert len(set(fmt.layer_types)) == 2 and fmt.nbytes == max(fmt.layer_bytes(0), fmt.layer_bytes(1))
    assert_close(logits(model), expected, "two layers")
    disk = load(path, expert_slots=2, host_memory=4 * fmt.nbytes, copy_backend="deferred", copy_seed=3)
    assert disk.offload.plan.disk_tier
    assert_close(logits(disk), expected, "two layers from the disk tier")
    assert_close(logits(load(path, expert_slots=1, cpu_experts="always")), expected, "two layers on the CPU")


@pytest.mark.parametrize("kinds", [("Q4_K", "Q4_K", "Q6_K"), ("Q5_K", "Q5_K", "Q6_K"), ("Q6_K", "Q4_0", "Q8_0")],
                         ids=["Q4_K-Q6_K", "Q5_K-Q6_K", "Q6_K-Q4_0-Q8_0"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_fused_cpu_kernel_equals_dequantize_then_matmul(kinds, tokens):
    """The CPU runner's two GGUF backends (each block decoded as it is multiplied, and the dequantized matrix
    through torch's matmul) agree to float32 rounding; the runner times both on first use and keeps one."""
    from moe_offload.cpu_kernels import CpuJob, CpuRunner
    from moe_offload.cpu_kernels.gguf_format import GGUFExpertFormat

    rng = np.random.default_rng(1)
    hidden, inter = 256, 512
    fmt = GGUFExpertFormat([[TYPE_BY_NAME[k] for k in kinds]], hidden, inter, torch.float32)
    row = torch.zeros(fmt.row_numel, dtype=torch.uint8)
    for proj, kind, (r, c) in zip(("gate", "up", "down"), kinds, ((inter, hidden), (inter, hidden), (hidden, inter))):
        fmt.write_bytes(row, proj, torch.from_numpy(random_blocks(kind, r, c, rng)))
    x = torch.from_numpy(rng.normal(size=(tokens, hidden)).astype(np.float32))
    gate_up, down = fmt.unpack(row)
    h = torch.nn.functional.silu(x.double() @ gate_up[:inter].double().T) * (x.double() @ gate_up[inter:].double().T)
    expected = (h @ down.double().T).float()
    fused = np.empty((tokens, hidden), np.float32)
    fmt.ffn_numba(x.numpy(), row.numpy(), 0, fused, np.empty(2 * tokens * inter, np.float32))
    assert_close(torch.from_numpy(fused), expected, "fused kernel")
    runner = CpuRunner()
    try:
        job = CpuJob(row.numpy(), np.arange(tokens), np.ones(tokens, np.float32), "silu", fmt=fmt)
        got = runner.run(x.numpy(), [job])
        assert_close(torch.from_numpy(np.array(got)), expected, "runner")
        timed = runner.timings[fmt.kernel_key]
        assert set(next(iter(timed.values()))) == {"numba", "torch"} and fmt.kernel_key in runner.choices
    finally:
        runner.close()


@pytest.mark.parametrize("kinds", [("Q4_K", "Q4_K", "Q6_K"), ("Q5_K", "Q5_K", "Q6_K"), ("Q6_K", "Q4_0", "Q8_0")],
                         ids=["Q4_K-Q6_K", "Q5_K-Q6_K", "Q6_K-Q4_0-Q8_0"])
def test_kquant_rows_through_the_runtime(tmp_path, kinds):
    """K-quant expert rows (random blocks with finite scales, written into the Mixtral fixture by the gguf
    package's writer) through the store, the copies (deferred), the device dequantization and the CPU path."""
    path = random_expert_blocks(fixture("mixtral-Q8_0.gguf"), tmp_path / "k.gguf", dict(zip(("gate", "up", "down"), kinds)))
    expected = logits(gguf_reference(path))
    for fields in (dict(expert_slots=1, copy_backend="deferred", copy_seed=1), dict(expert_slots=1, cpu_experts="always")):
        model = load(path, **fields)
        assert [t.name for t in model.offload.store.format.layer_types[0]] == list(kinds)
        assert_close(logits(model), expected, f"{kinds} {fields}")


def test_f16_file_is_the_model_it_was_converted_from(tmp_path, monkeypatch):
    """The config, names and llama's q/k un-permutation against the truth: every tensor read from the F16
    fixture equals, float16-rounded, the one of the checkpoint llama.cpp converted it from (rebuilt here by
    the fixture script's recipe), and the configs agree."""
    from transformers import AutoModelForCausalLM

    from moe_offload.loading.config import OffloadConfig
    from moe_offload.loading.parts import ModelParts
    from tiny_checkpoints import make_checkpoint

    path = fixture("mixtral-F16.gguf")
    monkeypatch.syspath_prepend(str(FIXTURES))
    recipe = pytest.importorskip("make_fixtures")
    source = make_checkpoint("mixtral", tmp_path / "src", seed=0, **(recipe.WIDE | recipe.FIXTURE_FAMILIES["mixtral"]))
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    parts = ModelParts(path, OffloadConfig(device="cpu", dtype=torch.float32, progress=False))
    if not torch.equal(parts.checkpoint.get("model.embed_tokens.weight"),
                       original["model.embed_tokens.weight"].half().float()):
        pytest.skip("this torch draws other random weights than the ones the fixture was converted from")
    for name, info in parts.checkpoint.tensors.items():
        if "experts" in name:
            got = torch.stack([parts.checkpoint.get_slice(name, e) for e in range(info.shape[0])])
        else:
            got = parts.checkpoint.get(name)
        want = original[name]
        assert torch.equal(got, want.half().float() if info.ggml_type == "F16" else want), name
    source_config = AutoModelForCausalLM.from_pretrained(source).config
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "vocab_size", "rms_norm_eps",
                  "tie_word_embeddings"):
        assert getattr(parts.hf_config, field) == pytest.approx(getattr(source_config, field)), field


def test_gguf_bytes_as_stored():
    """The host rows hold the file's expert bytes unchanged."""
    path = fixture(QUANTIZED[0])
    model = load(path)
    store, fmt = model.offload.store, model.offload.store.format
    tensors = {n: d for n, d, _ in stored(path)}
    for e in range(store.num_experts):
        row = store.block(store.key(0, e))
        where = fmt.offsets(0)
        for proj in ("gate", "up", "down"):
            data = np.ascontiguousarray(tensors[f"blk.{model.offload.moe_layers[0]}.ffn_{proj}_exps.weight"][e])
            got = row[where[proj]: where[proj] + data.nbytes].numpy()
            assert np.array_equal(got, data.view(np.uint8).reshape(-1)), (e, proj)


def test_gguf_split_set(tmp_path):
    path = fixture(QUANTIZED[0])
    rewrite(path, tmp_path / "model.gguf", stored(path), split_max_tensors=6)
    parts = sorted(tmp_path.glob("model-*-of-*.gguf"))
    assert len(parts) > 1
    assert_close(logits(load(parts[0], expert_slots=2)), logits(reference(path)), "split set")
    with pytest.raises(MoEOffloadError, match="give the first file"):
        load(parts[1])
    parts[-1].unlink()
    with pytest.raises(MoEOffloadError, match=f"{parts[-1].name}.*missing"):
        load(parts[0])


def test_gguf_bfloat16():
    path = fixture(QUANTIZED[0])
    assert_close(logits(load(path, torch.bfloat16, expert_slots=2)), logits(reference(path, torch.bfloat16)),
                 f"{path.name} in bf16")


def test_gguf_expert_dtype_requantizes():
    """An explicit expert_dtype re-quantizes the dequantized experts (int8 here), no warning."""
    from test_parity_quant import experts_modules

    from moe_offload.cpu_kernels.packed import ExpertFormat

    path = fixture(QUANTIZED[0])
    model = load(path, expert_slots=2, expert_dtype="int8")
    assert model.offload.store.format.name == "int8"
    ref = gguf_reference(path)
    with torch.no_grad():
        for module in experts_modules(ref):
            _, two_i, hidden = module.gate_up_proj.shape
            fmt = ExpertFormat("int8", hidden, two_i // 2, torch.float32)
            for e in range(module.gate_up_proj.shape[0]):
                module.gate_up_proj[e] = fmt.dequantized(module.gate_up_proj[e].clone(), "gate_up")
                module.down_proj[e] = fmt.dequantized(module.down_proj[e].clone(), "down")
    assert_close(logits(model), logits(ref), "int8 from GGUF")


def test_gguf_tokenizer():
    path = fixture(QUANTIZED[0])
    tok = moe_offload.load_tokenizer(path)
    text = "The router scores each expert"
    ids = tok(text).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == text and max(ids) < load(path).config.vocab_size


# -- bad input ---------------------------------------------------------------------------------------------------
def test_truncated_gguf(tmp_path):
    path = truncated(fixture(QUANTIZED[0]), tmp_path / "cut.gguf")
    with pytest.raises(MoEOffloadError, match=r"cut\.gguf.*truncated"):
        load(path)


def test_dense_gguf(tmp_path):
    path = dense_model(fixture(QUANTIZED[0]), tmp_path / "dense.gguf")
    with pytest.raises(MoEOffloadError, match=r"dense\.gguf.*dense .* model"):
        load(path)


def test_expert_type_not_kept(tmp_path):
    """Q5_0 experts: refused by name; with an explicit expert_dtype dequantized into it, with a warning that
    says the bytes, and equal to the reference."""
    path = requantized_experts(fixture(QUANTIZED[0]), tmp_path / "q5_0.gguf", gguf.GGMLQuantizationType.Q5_0)
    with pytest.raises(MoEOffloadError, match=r"q5_0\.gguf.*ffn_\w+_exps\.weight is Q5_0.*expert_dtype"):
        load(path)
    with pytest.warns(UserWarning, match=r"Q5_0.*dequantized into float32: .* bytes per expert"):
        model = load(path, expert_slots=2, expert_dtype="float32")
    assert_close(logits(model), logits(gguf_reference(path)), "Q5_0 experts as float32")


def test_cli_exit_2_and_info(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    bad = truncated(fixture(QUANTIZED[0]), tmp_path / "cut.gguf")
    done = subprocess.run(["moe-offload", "info", "--model", str(bad)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "cut.gguf" in done.stderr
    path = fixture(QUANTIZED[0])
    done = subprocess.run(["moe-offload", "info", "--model", str(path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    fmt = load(path).offload.store.format
    assert "GGUF (" in done.stdout and fmt.describe() in done.stdout and f"{fmt.nbytes:,} bytes" in done.stdout


def test_sweep_simulate_counts_gguf_bytes(tmp_path):
    """sweep --simulate plans with the GGUF rows' bytes (scales included, padded to the longest layer's)."""
    import json

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    path = fixture(QUANTIZED[0])
    done = subprocess.run(["moe-offload", "sweep", "--model", str(path), "--simulate", "--budgets", "50%",
                           "--policies", "lru", "--synthetic", "--synthetic-tokens", "64", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    row = json.loads((tmp_path / "sweep.json").read_text())["results"][0]
    assert row["budget_bytes"] == row["slots"] * load(path).offload.store.format.nbytes > 0


@pytest.mark.cuda
def test_gguf_on_cuda():
    """The device dequantization on a GPU: logits equal the reference's (run on the CPU)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for name in QUANTIZED:
        path = fixture(name)
        model = moe_offload.from_pretrained(path, device="cuda", dtype=torch.float32, progress=False, expert_slots=1)
        with torch.no_grad():
            got = model(TOKENS.cuda()).logits.cpu()
        assert_close(got, logits(reference(path)), f"{name} on cuda")


def test_reference_swap_matters():
    """Control: the Q8_0 file's logits are measurably far from the F16 file's (the same weights before
    quantization), so parity checks the dequantized blocks, not a loose tolerance."""
    f16, q = fixture("mixtral-F16.gguf"), fixture("mixtral-Q8_0.gguf")
    got = logits(load(q, expert_slots=2))
    assert rel_err(got, logits(reference(f16))) > 100 * rel_err(got, logits(reference(q)))
