"""Routing traces: recording on a tiny checkpoint, the .npz format, the trace command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from moe_offload.cli import main
from moe_offload.corpus import read_prompts, stdlib_prompts
from moe_offload.errors import MoEOffloadError
from moe_offload.predictor import TRACE_VERSION, Trace, TraceFormatError

from tiny_checkpoints import add_char_tokenizer

PROMPTS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\n"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, mixtral_dir):
    return add_char_tokenizer(shutil.copytree(mixtral_dir, tmp_path_factory.mktemp("trace") / "m"))


@pytest.fixture(scope="module")
def recorded(model_dir) -> Trace:
    from transformers import AutoTokenizer

    from moe_offload.loading.loader import from_pretrained
    from moe_offload.runtime.tracing import record_trace

    model = from_pretrained(model_dir, device="cpu", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return record_trace(model, tokenizer, PROMPTS, max_new_tokens=4, gate_inputs=True, progress=False)


def test_recorded_trace_has_one_row_per_token_and_layer(recorded):
    n, layers, k = recorded.expert_ids.shape
    assert (layers, k, recorded.num_experts) == (3, 2, 8)
    assert recorded.gate_inputs.shape == (n, 3, 32) and recorded.gate_inputs.dtype == np.float16
    assert recorded.meta["model_type"] == "mixtral" and recorded.meta["moe_layers"] == [0, 1, 2]
    for seq, prompt in enumerate(PROMPTS):
        rows = recorded.sequence == seq
        assert np.all(np.diff(np.flatnonzero(rows)) == 1)                          # contiguous
        assert (~recorded.decode[rows]).sum() == len(prompt)                       # one char = one token
        assert recorded.decode[rows].sum() <= 3                                    # max_new_tokens - 1 fed back
    chosen_scores = np.take_along_axis(recorded.router_probs, recorded.expert_ids.astype(np.int64), axis=2)
    assert np.all(chosen_scores.min(axis=2) >= np.sort(recorded.router_probs, axis=2)[..., -2])  # top-2 by score


def test_save_load_round_trip(recorded, tmp_path):
    loaded = Trace.load(recorded.save(tmp_path / "t.npz"))
    for name in ("expert_ids", "router_probs", "sequence", "decode", "gate_inputs"):
        assert np.array_equal(getattr(loaded, name), getattr(recorded, name)), name
    assert loaded.meta["version"] == TRACE_VERSION and loaded.meta["top_k"] == 2
    assert loaded.meta["moe_layers"] == [0, 1, 2]
    fit, held = loaded.split_sequences(every=3)
    assert set(held.sequence.tolist()) == {2} and fit.num_tokens + held.num_tokens == loaded.num_tokens


def test_load_refuses_other_versions_and_other_files(recorded, tmp_path):
    path = recorded.save(tmp_path / "t.npz")
    arrays = dict(np.load(path))
    arrays["meta"] = np.array(json.dumps(json.loads(str(arrays["meta"])) | {"version": TRACE_VERSION + 1}))
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(TraceFormatError, match="version"):
        Trace.load(tmp_path / "future.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceFormatError):
        Trace.load(tmp_path / "junk.npz")


def test_trace_command_writes_a_loadable_trace(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("def g():\n") + "\n" + json.dumps({"prompt": "x = 1\n"}) + "\n")
    out = tmp_path / "out.npz"
    assert main(["trace", "--model", str(model_dir), "--device", "cpu", "--prompts", str(prompts),
                 "--max-new-tokens", "3", "--out", str(out)]) == 0
    assert "traced 2 prompts" in capsys.readouterr().out
    trace = Trace.load(out)
    assert trace.gate_inputs is None and set(trace.sequence.tolist()) == {0, 1}
    assert (~trace.decode).sum() == len("def g():\n") + len("x = 1\n")


def test_fit_predictor_command_saves_a_loadable_correction(model_dir, recorded, tmp_path, capsys):
    from moe_offload.predictor import LearnedCorrection

    trace_path = recorded.save(tmp_path / "fit.npz")
    out = tmp_path / "c.safetensors"
    assert main(["fit-predictor", "--model", str(model_dir), "--device", "cpu", "--trace", str(trace_path),
                 "--out", str(out), "--distances", "2"]) == 0
    assert "learned correction fitted" in capsys.readouterr().out
    correction = LearnedCorrection.load(out)
    assert sorted(correction.maps) == [(0, 1), (0, 2), (1, 1)] and correction.feature_set == "layers"
    assert correction.maps[1, 1][0].shape == (2 * (32 + 2 * 8), 8)            # gate + routing of layers 1, 0
    assert correction.meta["fit_tokens"] == recorded.num_tokens


def test_read_prompts_jsonl_and_text(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('"a\\nb"\n\n{"prompt": "c"}\n')
    assert read_prompts(jsonl) == ["a\nb", "c"]
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\n")
    assert read_prompts(text) == ["first", "second"]
    jsonl.write_text('{"text": "c"}\n')
    with pytest.raises(MoEOffloadError, match="p.jsonl:1"):
        read_prompts(jsonl)
    with pytest.raises(MoEOffloadError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")


def test_stdlib_prompts_come_from_the_requested_split():
    from moe_offload.corpus import read_file, stdlib_split

    train, held = stdlib_split()
    prompts = stdlib_prompts(3, held_out=True, lines=5)
    assert 1 <= len(prompts) <= 3
    held_heads = {"".join(read_file(p).splitlines(keepends=True)[:5]) for p in held}
    assert all(p in held_heads for p in prompts)
    assert all(len(p.splitlines()) <= 5 for p in stdlib_prompts(4, held_out=False, lines=5))


def test_cached_trace_records_once_per_model_prompts_and_recipe(model_dir, recorded, tmp_path):
    from transformers import AutoTokenizer

    from moe_offload.loading.loader import from_pretrained
    from moe_offload.runtime.tracing import cached_trace

    model = from_pretrained(model_dir, device="cpu", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def trace(prompts=PROMPTS, new_tokens=4):
        return cached_trace(model, tokenizer, prompts, new_tokens, gate_inputs=True, folder=tmp_path, label="t",
                            meta={"prompts": "test"}, progress=False)

    first, path, hit = trace()
    assert not hit and path.is_file() and path.parent == tmp_path
    again, same_path, hit = trace()
    assert hit and same_path == path and again.meta["prompts"] == "test"
    for name in ("expert_ids", "router_probs", "sequence", "decode", "gate_inputs"):
        assert np.array_equal(getattr(again, name), getattr(recorded, name)), name
    assert trace(new_tokens=3)[1] != path                    # another recipe: another file
    assert trace(prompts=PROMPTS[:2])[1] != path              # other prompts: another file
    path.write_bytes(b"not a trace")                          # a corrupt file is recorded again, never used
    rerecorded, _, hit = trace()
    assert not hit and np.array_equal(rerecorded.expert_ids, recorded.expert_ids)
    assert not list(tmp_path.glob("*.partial.npz"))
