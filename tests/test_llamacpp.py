"""bench/llamacpp.py: finding a llama.cpp build, the expert-only quantization flags, llama-bench's JSON,
the tokenizer staging; with a build ($LLAMA_CPP_DIR), a real conversion and quantization."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import llamacpp  # noqa: E402
from llamacpp import LlamaCpp, dense_kept_flags, parse_bench_json, converter_view  # noqa: E402

from moe_offload.errors import MoEOffloadError  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "gguf"


def fake_build(root: Path) -> Path:
    """A folder laid out like a llama.cpp source tree with a CPU build (empty files)."""
    (root / "build" / "bin").mkdir(parents=True)
    (root / "convert_hf_to_gguf.py").touch()
    for tool in llamacpp.TOOLS:
        (root / "build" / "bin" / tool).touch()
    return root


def test_locate_finds_nothing_when_nothing_is_named(monkeypatch):
    monkeypatch.delenv(llamacpp.ENV_VAR, raising=False)
    assert LlamaCpp.locate(None) is None


@pytest.mark.parametrize("named", ["", "build", "build/bin"], ids=["source", "build", "bin"])
def test_locate_accepts_source_build_and_bin_folders(tmp_path, named):
    root = fake_build(tmp_path / "llama.cpp")
    build = LlamaCpp.locate(root / named if named else root)
    assert build == LlamaCpp(root.resolve(), (root / "build" / "bin").resolve())
    assert all(build.tool(t).is_file() for t in llamacpp.TOOLS)


def test_locate_reads_the_environment(tmp_path, monkeypatch):
    root = fake_build(tmp_path / "llama.cpp")
    monkeypatch.setenv(llamacpp.ENV_VAR, str(root / "build"))
    assert LlamaCpp.locate(None).source == root.resolve()


def test_locate_rejects_a_folder_without_the_converter(tmp_path):
    root = fake_build(tmp_path / "llama.cpp")
    (root / "convert_hf_to_gguf.py").unlink()
    with pytest.raises(MoEOffloadError, match="not a llama.cpp folder"):
        LlamaCpp.locate(root)


def test_a_tool_not_built_yet_is_named_when_used(tmp_path):
    root = fake_build(tmp_path / "llama.cpp")
    (root / "build" / "bin" / "llama-bench").unlink()
    build = LlamaCpp.locate(root)
    assert build.has_tool("llama-quantize") and not build.has_tool("llama-bench")
    with pytest.raises(MoEOffloadError, match="no llama-bench: build it .* --target llama-bench"):
        build.bench(tmp_path / "model.gguf")


@pytest.mark.parametrize("name, dense", [
    ("token_embd.weight", True), ("output.weight", True), ("blk.0.attn_q.weight", True),
    ("blk.3.ffn_gate_shexp.weight", True), ("blk.0.ffn_down.weight", True), ("blk.1.attn_kv_a_mqa.weight", True),
    ("blk.0.ffn_gate_exps.weight", False), ("blk.12.ffn_up_exps.weight", False), ("blk.2.ffn_down_exps.weight", False),
])
def test_expert_only_flags_name_every_weight_but_the_routed_experts(name, dense):
    """llama-quantize lowercases the pattern and applies it with std::regex_search (ECMAScript, as re here)."""
    flags = dense_kept_flags()
    pattern, kept = flags[flags.index("--tensor-type") + 1].rsplit("=", 1)
    assert kept == llamacpp.DENSE_TYPE
    assert (re.search(pattern.lower(), name) is not None) == dense


BENCH_OUTPUT = """load_backend: loaded CPU backend
[
  {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "model_type": "llama 8x7B BF16",
   "model_size": 1000000, "model_n_params": 500000, "n_threads": 2, "n_prompt": 64, "n_gen": 0,
   "avg_ts": 42.5, "stddev_ts": 0.5},
  {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "model_type": "llama 8x7B BF16",
   "model_size": 1000000, "model_n_params": 500000, "n_threads": 2, "n_prompt": 0, "n_gen": 32,
   "avg_ts": 10.25, "stddev_ts": 0.1}
]
"""


def test_bench_rows_from_llama_bench_json():
    rows = [llamacpp.BenchRow.from_json(r) for r in parse_bench_json(BENCH_OUTPUT)]
    assert [(r.test, r.tokens_per_s, r.threads) for r in rows] == [("pp64", 42.5, 2), ("tg32", 10.25, 2)]
    assert rows[0].build == "1 (0c1e570)" and rows[1].model_bytes == 1000000


@pytest.mark.parametrize("text", ["", "error: failed to load model", '[{"n_prompt": 64}]', "[1, 2"])
def test_bench_output_without_records_is_an_error(text):
    with pytest.raises(MoEOffloadError, match="llama-bench"):
        parse_bench_json(text)


def test_checkpoint_with_a_tokenizer_is_converted_in_place(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    assert converter_view(tmp_path / "ckpt", tmp_path / "staging") == tmp_path / "ckpt"


def test_checkpoint_without_a_tokenizer_borrows_the_shipped_one(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"vocab_size": 32000, "model_type": "mixtral"}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "staging").mkdir()
    staged = converter_view(ckpt, tmp_path / "staging")
    assert (staged / "model.safetensors").resolve() == (ckpt / "model.safetensors").resolve()
    assert json.loads((staged / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert json.loads((staged / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert not (ckpt / "tokenizer.json").exists() and "architectures" not in (ckpt / "config.json").read_text()


def test_checkpoint_without_a_tokenizer_and_a_small_vocabulary_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"vocab_size": 100, "architectures": ["X"]}))
    (tmp_path / "staging").mkdir()
    with pytest.raises(MoEOffloadError, match="add a tokenizer.json"):
        converter_view(tmp_path / "ckpt", tmp_path / "staging")


def _tensor_types(path: Path) -> dict[str, str]:
    gguf = pytest.importorskip("gguf")
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _readme_rows() -> list[tuple[str, int, str]]:
    """(file, bytes, sha256 prefix) of each row of the fixtures' README table."""
    rows = re.findall(r"^\| `([^`]+\.gguf)` \|.*\| ([\d,]+) \| `([0-9a-f]+)` \|$",
                      (FIXTURES / "README.md").read_text(), flags=re.M)
    return [(name, int(size.replace(",", "")), digest) for name, size, digest in rows]


def test_committed_fixtures_are_the_files_the_readme_lists():
    import hashlib

    rows = _readme_rows()
    assert {name for name, _, _ in rows} == {p.name for p in FIXTURES.glob("*.gguf")}
    for name, size, digest in rows:
        data = (FIXTURES / name).read_bytes()
        assert data[:4] == b"GGUF" and len(data) == size, name
        assert hashlib.sha256(data).hexdigest().startswith(digest), name


def test_committed_expert_only_fixture_keeps_dense_weights_in_bf16():
    path = FIXTURES / "mixtral-Q4_0-experts.gguf"
    if not path.exists():
        pytest.skip("not made yet: needs a built llama-quantize (tests/fixtures/gguf/README.md)")
    types = _tensor_types(path)
    for tensor, kind in types.items():
        if "_exps." in tensor:
            assert kind == "Q4_0", tensor
        elif tensor.endswith("_norm.weight") or "ffn_gate_inp" in tensor:
            assert kind == "F32", tensor
        else:
            assert kind == "BF16", tensor


@pytest.mark.parametrize("folder", [None, "not-llama", "source-only"])
def test_side_by_side_without_a_build_says_so_and_exits_2(tmp_path, monkeypatch, capsys, folder):
    import vs_llamacpp

    monkeypatch.delenv(llamacpp.ENV_VAR, raising=False)
    if folder == "source-only":
        (tmp_path / folder).mkdir()
        (tmp_path / folder / llamacpp.CONVERTER).touch()
    argv = ["--out", str(tmp_path / "out")] + (["--llama-cpp", str(tmp_path / folder)] if folder else [])
    assert vs_llamacpp.main(vs_llamacpp.parse_args(argv)) == vs_llamacpp.NO_BUILD_EXIT
    assert "llama.cpp" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_convert_and_quantize_with_a_real_build(tmp_path):
    """Needs $LLAMA_CPP_DIR: the shipped tiny-mixtral converted (unknown pre-tokenizer) and its experts quantized."""
    build = LlamaCpp.locate(None)
    if build is None or not build.built():
        pytest.skip(f"no llama.cpp build (set {llamacpp.ENV_VAR})")
    from moe_offload.models import shipped_model_dir

    bf16 = build.convert(shipped_model_dir("tiny-mixtral"), tmp_path / "bf16.gguf", outtype="bf16")
    q4 = build.quantize(bf16, tmp_path / "q4.gguf", "Q4_0", experts_only=True)
    assert q4.is_file() and q4.stat().st_size < bf16.stat().st_size
    assert not list(tmp_path.glob(".*")), "no partial files left behind"
    types = _tensor_types(q4)
    assert {k for n, k in types.items() if "_exps." in n} == {"Q4_0"}
    assert types["blk.0.attn_q.weight"] == "BF16"
