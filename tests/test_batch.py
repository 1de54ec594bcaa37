"""Batched, chunked prefill and offline batch generation: every sequence's greedy tokens equal plain
transformers' ``generate`` on that prompt alone, for every family, under deferred copies and with CPU
experts; ``generate_batch``'s answers in input order; ``moe-offload batch`` end to end, resumed after an
interruption (a partial last line), and its errors on bad input.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_offload
from moe_offload.cli import main
from moe_offload.errors import MoEOffloadError
from moe_offload.offline import submission_order
from moe_offload.serve.engine import BatchEngine, GenerationRequest, SamplingParams

from tiny_checkpoints import FAMILIES, add_char_tokenizer, num_experts

NEW_TOKENS = 5
# Ragged prompts: the longest is prefilled in chunks of CHUNK over several steps while others decode.
LENGTHS = (3, 21, 9, 14, 5, 30)
CHUNK = 8


def prompt_ids(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in LENGTHS]


def alone(model, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's greedy continuation by ``model.generate``, one prompt at a time."""
    out = []
    with torch.inference_mode():
        for ids in prompts:
            full = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            out.append(full[0, len(ids):].tolist())
    return out


def engine_ids(model, tokenizer, prompts: list[list[int]], after_step=None,
               **limits) -> tuple[list[list[int]], BatchEngine]:
    """Every prompt through the serving engine's step loop (all submitted at once): the generated ids.
    ``after_step(engine)`` runs after each step."""
    engine = BatchEngine(model, tokenizer, max_queue=len(prompts), **limits)
    requests = [GenerationRequest(ids, SamplingParams(max_tokens=NEW_TOKENS), tokenizer, lambda update: None)
                for ids in prompts]
    for request in requests:
        engine.submit(request)
    with torch.inference_mode():
        while not engine.idle:
            engine.step()
            if after_step is not None:
                after_step(engine)
    return [r.text.tokens for r in requests], engine


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(add_char_tokenizer(tmp_path_factory.mktemp("chars")))


# (family, cpu_experts): every family under deferred copies with half the slots; two also with every miss
# on the CPU's kernels.
CASES = [(f, "never") for f in FAMILIES] + [("mixtral", "always"), ("deepseek_v2", "always")]


@pytest.mark.parametrize(("family", "cpu_experts"), CASES, ids=[f"{f}-cpu-{m}" for f, m in CASES])
def test_batched_chunked_prefill_matches_generate_alone(checkpoints, char_tokenizer, family, cpu_experts):
    """Six ragged prompts, at most four sequences at once, prefills of 8 tokens per sequence and 16 padded
    tokens per forward: prompts join while others decode, the longest over four steps."""
    path = checkpoints[family]
    prompts = prompt_ids(96)
    expected = alone(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), prompts)
    model = moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False,
                                        expert_slots=num_experts(family) // 2, copy_backend="deferred", copy_seed=1,
                                        cpu_experts=cpu_experts)
    try:
        got, engine = engine_ids(model, char_tokenizer, prompts, max_batch=4, prefill_chunk=CHUNK, prefill_tokens=16)
        stats = model.offload.stats
        assert stats.misses.sum() > 0
        assert (stats.cpu_experts.sum() > 0) == (cpu_experts == "always")
    finally:
        model.offload.close()
    assert got == expected
    counters = engine.counters
    assert counters.prefills == len(prompts) and counters.prompt_tokens == sum(LENGTHS)
    assert counters.prefill_steps < sum(-(-n // CHUNK) for n in LENGTHS)  # some prefills ran together
    assert counters.decode_rows > counters.decode_steps  # decodes ran batched


def test_padded_batch_moves_rows_between_batches():
    """take/merge keep each row's mask and KV; columns that are padding in every row are cut."""
    from transformers import DynamicCache

    from moe_offload.serve.batch import PaddedBatch

    def batch_of(lengths: list[int], start: float) -> PaddedBatch:
        batch = PaddedBatch(len(lengths))
        batch.feed([[1] * n for n in lengths])
        cache = DynamicCache()
        width = max(lengths)
        keys = torch.arange(len(lengths) * width, dtype=torch.float32).reshape(len(lengths), 1, width, 1) + start
        cache.update(keys, -keys, 0)
        batch.cache = cache
        return batch

    first, second = batch_of([2, 4], 0.0), batch_of([3], 100.0)
    first.merge(second)
    assert first.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]
    assert first.cache.layers[0].keys[2, 0, :, 0].tolist() == [0.0, 100.0, 101.0, 102.0]
    taken = first.take([2, 0])
    assert taken.mask.tolist() == [[1, 1, 1], [0, 1, 1]]  # the column no taken row uses is cut
    assert taken.cache.layers[0].keys[:, 0, :, 0].tolist() == [[100.0, 101.0, 102.0], [1.0, 2.0, 3.0]]
    assert first.mask.tolist() == [[1, 1, 1, 1]] and first.cache.layers[0].keys[0, 0, :, 0].tolist() == [4, 5, 6, 7]
    inputs = taken.feed([[5], [6, 7]])
    assert inputs["input_ids"].tolist() == [[0, 5], [6, 7]]
    assert inputs["position_ids"].tolist() == [[2, 3], [2, 3]]  # real tokens before each, padding skipped


SHIPPED = ["tiny-mixtral", "tiny-deepseek"]
TEXT_PROMPTS = ["def fibonacci(n):\n", "import os\n", "class Stack:\n    def __init__(self):\n", "x = 1",
                "for i in range(10):\n    print(i)\n", "# Copyright 2001 Python Software Foundation\n"]


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    model = moe_offload.from_pretrained(request.param, device="cpu", dtype="float32", expert_slots=12,
                                        copy_backend="deferred", copy_seed=2, progress=False)
    yield model
    model.offload.close()


def test_generate_batch_equals_generate_per_prompt(shipped):
    tokenizer = moe_offload.load_tokenizer(shipped.config._name_or_path)
    expected = [tokenizer.decode(ids, skip_special_tokens=True)
                for ids in alone(shipped, [tokenizer(p)["input_ids"] for p in TEXT_PROMPTS])]
    results = moe_offload.generate_batch(shipped, TEXT_PROMPTS, max_tokens=NEW_TOKENS, batch_size=4,
                                         prefill_chunk=6, progress=False)
    assert [r.text for r in results] == expected
    assert all(r.finish_reason == "length" and r.completion_tokens == NEW_TOKENS for r in results)
    assert [r.prompt_tokens for r in results] == [len(tokenizer(p)["input_ids"]) for p in TEXT_PROMPTS]


def test_jobs_go_to_the_engine_shortest_first_within_each_batch_window():
    lengths = [5, 2, 9, 2, 7, 1, 3]
    assert submission_order(lengths, 3) == [1, 0, 2, 5, 3, 4, 6]   # windows [0, 3), [3, 6), [6, 7); ties in input order
    assert submission_order(lengths, 100) == sorted(range(7), key=lambda i: (lengths[i], i))
    assert submission_order(lengths, 1) == list(range(7))
    assert submission_order([], 4) == []


def test_generate_batch_per_prompt_fields(shipped):
    """Request objects carry their own fields: id, max_tokens, stop, a seeded sample (the same answer alone
    or in a batch), chat messages."""
    base = moe_offload.generate_batch(shipped, TEXT_PROMPTS[:1], max_tokens=NEW_TOKENS, progress=False)[0].text
    stop = base[2:4]
    sampled = {"id": "s", "prompt": TEXT_PROMPTS[1], "temperature": 1.0, "seed": 5, "max_tokens": 6}
    requests = [{"id": "a", "prompt": TEXT_PROMPTS[0], "max_tokens": NEW_TOKENS, "stop": [stop]}, sampled,
                {"id": 3, "prompt": TEXT_PROMPTS[2], "max_tokens": 2}]
    results = moe_offload.generate_batch(shipped, requests, progress=False)
    assert [r.id for r in results] == ["a", "s", 3]
    assert (results[0].text, results[0].finish_reason) == (base[:base.index(stop)], "stop")
    assert results[2].completion_tokens == 2 and results[2].to_json()["usage"]["total_tokens"] == \
        results[2].prompt_tokens + 2
    assert moe_offload.generate_batch(shipped, [sampled], progress=False)[0].text == results[1].text
    with pytest.raises(MoEOffloadError, match="prompt 1: 'max_tokens' must be at least 1"):
        moe_offload.generate_batch(shipped, ["x", {"prompt": "y", "max_tokens": 0}], progress=False)
    with pytest.raises(MoEOffloadError, match="prompt 0: it has neither 'prompt' nor 'messages'"):
        moe_offload.generate_batch(shipped, [{"max_tokens": 3}], progress=False)


def test_batch_size_comes_from_the_memory_plan(shipped):
    """The plan's KV bytes per token are what the cache really holds per token; the batch is capped by
    the jobs and by MAX_BATCH when memory allows more."""
    from transformers import DynamicCache

    from moe_offload.offline import MAX_BATCH, BatchJob, plan_batch
    from moe_offload.serve.batch import cache_argument

    jobs = [BatchJob("p", None, [1] * 10, SamplingParams(max_tokens=6))] * (MAX_BATCH + 10)
    plan = plan_batch(shipped, jobs)
    cache = DynamicCache(config=shipped.config)
    with torch.inference_mode():
        shipped(input_ids=torch.ones(1, 10, dtype=torch.long), **{cache_argument(shipped): cache})
    held = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert plan.kv_bytes_per_token * 10 == held
    assert plan.tokens_per_sequence == 16 and plan.kv_memory == "host memory"
    assert plan.batch_size == MAX_BATCH and f"batch of {MAX_BATCH} sequences" in plan.describe()
    assert plan_batch(shipped, jobs[:5]).batch_size == 5


def _write(path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def _batch(tmp_path, *flags: str) -> int:
    return main(["batch", "--model", "tiny-mixtral", "--device", "cpu", "--dtype", "float32", "--expert-slots", "12",
                 "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), *flags])


def test_cli_batch_writes_in_order_and_resumes(tmp_path, capsys):
    requests = [{"id": f"r{i}", "prompt": p, "max_tokens": 3 + i % 3} for i, p in enumerate(TEXT_PROMPTS[:4])]
    requests[1] = {"messages": [{"role": "user", "content": "a loop"}], "max_tokens": 4}  # no id
    _write(tmp_path / "in.jsonl", requests[:2] + [""] + requests[2:])  # a blank line is skipped
    assert _batch(tmp_path) == 0
    assert "batch of 4 sequences" in capsys.readouterr().out
    whole = (tmp_path / "out.jsonl").read_text()
    answers = [json.loads(line) for line in whole.splitlines()]
    assert [a.get("id") for a in answers] == ["r0", None, "r2", "r3"]
    assert [a["usage"]["completion_tokens"] for a in answers] == [3, 4, 5, 3]
    assert all(set(a) >= {"text", "finish_reason", "usage"} for a in answers)
    # Interrupted after one answer and a half: the rerun keeps the first, rewrites the rest.
    lines = whole.splitlines(keepends=True)
    (tmp_path / "out.jsonl").write_text(lines[0] + lines[1][:9])
    assert _batch(tmp_path) == 0
    assert "(1 already answered" in capsys.readouterr().out
    assert (tmp_path / "out.jsonl").read_text() == whole
    assert _batch(tmp_path) == 0  # nothing left: the model is not even loaded
    assert "already answers all 4 requests" in capsys.readouterr().out


@pytest.mark.parametrize(("lines", "message"), [
    (['{"prompt": "x"}', '{"prompt": '], "in.jsonl line 2: not valid JSON"),
    (['{"prompt": "x"}', '{"max_tokens": 3}'], "in.jsonl line 2: each line must be an object with 'prompt'"),
    (['"just a string"'], "in.jsonl line 1: each line must be an object"),
    (['{"prompt": "x"}', '{"prompt": "y", "max_tokens": "5"}'], "in.jsonl line 2: 'max_tokens' must be an integer"),
    (['{"prompt": "x", "temperature": 7}'], "in.jsonl line 1: 'temperature' must be between 0 and 2"),
    (['{"prompt": "x", "id": [1]}'], "in.jsonl line 1: 'id' must be a string or an integer"),
    ([""], "has no requests"),
], ids=["bad-json", "missing-prompt", "not-an-object", "bad-max-tokens", "bad-temperature", "bad-id", "empty"])
def test_cli_batch_bad_input_names_the_line(tmp_path, capsys, lines, message):
    _write(tmp_path / "in.jsonl", lines)
    assert _batch(tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bars, if any
    assert err.startswith("moe-offload: error:") and message in err
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


def test_cli_batch_unreadable_input_and_foreign_output(tmp_path, capsys):
    assert _batch(tmp_path) == 2  # no in.jsonl
    assert "cannot read" in capsys.readouterr().err
    _write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    _write(tmp_path / "out.jsonl", [{"id": "b", "text": "", "finish_reason": "stop", "usage": {}}])
    assert _batch(tmp_path) == 2
    assert "answers id 'b'" in capsys.readouterr().err


SPLIT_CASES = ["mixtral", "deepseek_v2", "qwen2_moe"]


@pytest.mark.parametrize("family", SPLIT_CASES)
def test_micro_batched_attention_matches_generate_alone(checkpoints, char_tokenizer, family):
    """Module-based batching: attention in micro-batches of two sequences over the host-resident KV cache
    (chunked prefill, rows joining and leaving), every MoE layer once per step over all of them; the model's
    own attention modules are back afterwards."""
    from moe_offload.serve.microbatch import AttentionSplit, MicroBatchedAttention, micro_batched_attention

    path = checkpoints[family]
    prompts = prompt_ids(96)
    expected = alone(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), prompts)
    model = moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False,
                                        expert_slots=num_experts(family) // 2, copy_backend="deferred", copy_seed=3)
    try:
        before = [layer.self_attn for layer in model.model.layers]
        with micro_batched_attention(model, AttentionSplit.for_model(model, 2)):
            assert all(isinstance(layer.self_attn, MicroBatchedAttention) for layer in model.model.layers)
            got, engine = engine_ids(model, char_tokenizer, prompts, max_batch=5, prefill_chunk=CHUNK,
                                     prefill_tokens=24)
        assert [layer.self_attn for layer in model.model.layers] == before
    finally:
        model.offload.close()
    assert got == expected
    assert engine.counters.decode_rows > 2 * engine.counters.decode_steps  # micro-batches of 2 in bigger steps


@pytest.mark.cuda
def test_micro_batched_attention_on_cuda_keeps_the_kv_cache_in_host_memory(checkpoints, char_tokenizer):
    """On the GPU: the same greedy tokens, and between steps every layer's KV cache is in host memory."""
    from moe_offload.serve.microbatch import AttentionSplit, micro_batched_attention

    path = checkpoints["mixtral"]
    prompts = prompt_ids(96)
    expected = alone(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), prompts)
    model = moe_offload.from_pretrained(path, device="cuda", dtype=torch.float32, progress=False, expert_slots=4)
    places = set()

    def record(engine: BatchEngine) -> None:
        if engine._batch.cache is not None:
            places.update(layer.keys.device.type for layer in engine._batch.cache.layers)

    try:
        with micro_batched_attention(model, AttentionSplit.for_model(model, 2)):
            got, _ = engine_ids(model, char_tokenizer, prompts, record, max_batch=5, prefill_chunk=CHUNK)
    finally:
        model.offload.close()
    assert got == expected
    assert places == {"cpu"}
