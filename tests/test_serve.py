"""`moe-offload serve`: the real server in a subprocess on a loopback port, driven by the official
`openai` client (and httpx for bodies that client cannot send): completions, chat, streaming,
concurrent streams, greedy answers equal to single-prompt `generate`, every bad input, a client that
disconnects mid-stream, a full queue. Plus the batch itself in-process: batched decode logits
against each sequence run alone.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")

import moe_offload  # noqa: E402
from moe_offload.cli import main  # noqa: E402
from moe_offload.cli.common import load_tokenizer  # noqa: E402
from moe_offload.serve.process import ServerProcess  # noqa: E402

MODEL = "tiny-mixtral"
API_KEY = "test-key"
NEW_TOKENS = 6
STARTUP_S = 90  # the longest the server may take to answer /health (imports, model load)
# Sixteen prompts of different lengths (3 to 40 tokens), so the batch is ragged.
PROMPTS = [
    "def fibonacci(n):\n", "import os\n", "class Stack:\n    def __init__(self):\n", "x = 1",
    "for i in range(10):\n    print(i)\n", "# Copyright 2001 Python Software Foundation\n", "return",
    "def main(argv=None):\n    parser = argparse.ArgumentParser()\n", "while True:\n", "try:\n    import re\n",
    "with open(path) as f:\n    data = f.read()\n", "@property\ndef name(self):\n", "if __name__ == '__main__':\n",
    "from collections import OrderedDict, defaultdict, namedtuple\n\n\nclass Cache(OrderedDict):\n", "lambda",
    "def __repr__(self):\n        return",
]


class Server(ServerProcess):
    """A `moe-offload serve` subprocess with the official client and an httpx client for it."""

    def __init__(self, log: Path, *flags: str) -> None:
        super().__init__(["--model", MODEL, "--device", "cpu", "--dtype", "float32", *flags], log, API_KEY)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.http.close()
        self.client.close()
        super().stop()

    def wait_metric(self, name: str, ok, timeout: float = 20) -> float:
        """Poll /metrics until ``ok(value)``; the last value either way."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.metrics()[name]
            if ok(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.1)

    def complete(self, prompt: str = "x = 1", max_tokens: int = 1):
        return self.client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)


def _start(tmp_path_factory, name: str, *flags: str, meanwhile=None):
    """A ready server; ``meanwhile()`` runs while it loads."""
    server = Server(tmp_path_factory.mktemp(name) / "server.log", *flags)
    try:
        if meanwhile is not None:
            meanwhile()
        server.wait_ready(STARTUP_S)
    except RuntimeError as err:
        server.stop()
        pytest.fail(str(err))
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    server = _start(tmp_path_factory, "serve", "--max-batch", "8", "--max-queue", "16",
                    meanwhile=lambda: request.getfixturevalue("reference"))  # the reference answers, meanwhile
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model():
    model = moe_offload.from_pretrained(MODEL, device="cpu", dtype="float32")
    yield model
    model.offload.close()


@pytest.fixture(scope="module")
def tokenizer(model):
    return load_tokenizer(model)


def _generate(model, tokenizer, ids: list[int], new_tokens: int = NEW_TOKENS) -> str:
    """The library's greedy answer for one prompt alone: the reference every server answer must equal."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(model, tokenizer) -> dict[str, str]:
    return {p: _generate(model, tokenizer, tokenizer(p)["input_ids"]) for p in PROMPTS}


def _in_threads(fn, args: list) -> list:
    """``fn(arg)`` for every arg, all at once on threads; results in order (exceptions re-raised)."""
    results = [None] * len(args)

    def worker(i):
        try:
            results[i] = fn(args[i])
        except Exception as err:  # noqa: BLE001 (handed to the test thread)
            results[i] = err

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


def _stream_text(server: Server, prompt: str, **fields) -> tuple[str, list]:
    """A streamed completion: its text and its chunks."""
    chunks = list(server.client.completions.create(model=MODEL, prompt=prompt, stream=True, **fields))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_concurrent_greedy_answers_equal_single_prompt_generate(server, reference, tokenizer):
    """Six ragged prompts at once, whole answers: each equals `generate` on that prompt alone."""
    prompts = PROMPTS[:6]
    answers = _in_threads(lambda p: server.client.completions.create(
        model=MODEL, prompt=p, max_tokens=NEW_TOKENS, temperature=0), prompts)
    for prompt, answer in zip(prompts, answers):
        assert answer.choices[0].text == reference[prompt]
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
        assert answer.usage.completion_tokens == NEW_TOKENS
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + NEW_TOKENS
        assert answer.model == MODEL and answer.object == "text_completion"


def test_sixteen_concurrent_streams_all_complete(server, reference):
    """16 streams through the official client at once (8 decode together, 8 queue): every one ends with a
    finish_reason and usage, and its text equals the single-prompt greedy answer."""
    results = _in_threads(lambda p: _stream_text(server, p, max_tokens=NEW_TOKENS, temperature=0), PROMPTS)
    for prompt, (text, chunks) in zip(PROMPTS, results):
        assert text == reference[prompt]
        assert chunks[-1].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == NEW_TOKENS
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert server.metrics()["moe_offload_decode_sequences_total"] > server.metrics()["moe_offload_decode_steps_total"]


def test_stream_sends_sse_ending_in_done(server, reference):
    with server.http.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference[PROMPTS[0]]
    assert chunks[-1]["usage"]["completion_tokens"] == NEW_TOKENS


def test_chat_uses_the_chat_template(server, model, tokenizer):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a loop"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW_TOKENS,
                                                   temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == _generate(model, tokenizer, ids)
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == NEW_TOKENS
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW_TOKENS,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_stop_strings_seed_and_unknown_fields(server, reference):
    prompt = PROMPTS[0]
    full = reference[prompt]
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a stop string inside the greedy answer
    answer = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                              stop=[stop, "never printed"])
    assert answer.choices[0].text == full[:full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed, _ = _stream_text(server, prompt, max_tokens=NEW_TOKENS, temperature=0, stop=stop)
    assert streamed == answer.choices[0].text
    sampled = [server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0,
                                                top_p=0.9, seed=7, extra_body={"frobnicate": True}).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # the seed is per request, whatever else runs in the batch


def test_logit_bias_top_k_and_usage_chunk(server, tokenizer, reference):
    """The sampling fields change what is generated (none is silently ignored); include_usage adds a last
    chunk with no choices and the request's usage."""
    prompt = PROMPTS[0]
    forced = tokenizer("x")["input_ids"][-1]
    biased = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                              logit_bias={str(forced): 100})
    assert biased.choices[0].text == tokenizer.decode([forced] * 4)
    top1 = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=2.0,
                                            seed=3, extra_body={"top_k": 1})
    assert top1.choices[0].text == reference[prompt]            # top-1 sampling at any temperature is greedy
    chunks = list(server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.choices for c in chunks[:-1])


def _greedy_with_logprobs(model, ids: list[int], steps: int, bias: dict[int, float] | None = None):
    """The reference for logprobs, straight from transformers' logits: ``steps`` greedy tokens after ``ids``
    with ``bias`` added to the logits, and the log_softmax each token was chosen from, [steps, V]."""
    generated, rows = [], []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + generated])).logits[0, -1].float()  # [V]
            for token, value in (bias or {}).items():
                logits[token] += value
            rows.append(torch.log_softmax(logits, dim=-1))
            generated.append(int(logits.argmax()))
    return generated, torch.stack(rows)


def test_completion_logprobs_equal_transformers_log_softmax(server, model, tokenizer):
    """``logprobs: 3`` on /v1/completions, whole and streamed: each token's text and log probability, the
    three most likely tokens (plus the chosen one) and text offsets, against log_softmax of the logits
    transformers gives for the same prefix (1e-4: the server's incremental decode rounds differently)."""
    prompt = PROMPTS[2]
    generated, ref = _greedy_with_logprobs(model, tokenizer(prompt)["input_ids"], NEW_TOKENS)  # [N], [N, V]
    answer = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                              logprobs=3)
    got = answer.choices[0].logprobs
    texts = [tokenizer.decode([t]) for t in generated]
    assert got.tokens == texts and "".join(texts) == answer.choices[0].text
    torch.testing.assert_close(torch.tensor(got.token_logprobs), ref[range(NEW_TOKENS), generated], rtol=0, atol=1e-4)
    for row, top in enumerate(got.top_logprobs):
        values, best = ref[row].topk(3)
        assert list(top) == [tokenizer.decode([t]) for t in best.tolist()]  # the chosen (greedy) one is first
        torch.testing.assert_close(torch.tensor(list(top.values())), values, rtol=0, atol=1e-4)
    assert got.text_offset == [sum(len(t) for t in texts[:i]) for i in range(NEW_TOKENS)]
    chunks = [c for c in server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS,
                                                          temperature=0, logprobs=3, stream=True) if c.choices]
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == texts
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == got.text_offset
    torch.testing.assert_close([lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs],
                               got.token_logprobs, rtol=0, atol=1e-5)


def test_chat_logprobs_after_logit_bias(server, model, tokenizer):
    """Chat ``logprobs`` + ``top_logprobs``, streamed and whole, with a ``logit_bias``: the log probabilities
    are those of the logits the token was chosen from, the bias added (as OpenAI's are)."""
    messages = [{"role": "user", "content": "a loop"}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False)["input_ids"]
    favoured = tokenizer("x")["input_ids"][-1]
    generated, ref = _greedy_with_logprobs(model, ids, NEW_TOKENS, {favoured: 4.0})  # [N], [N, V]
    fields = {"model": MODEL, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": True,
              "top_logprobs": 2, "logit_bias": {str(favoured): 4.0}}
    whole = server.client.chat.completions.create(**fields).choices[0].logprobs.content
    streamed = [e for c in server.client.chat.completions.create(**fields, stream=True) if c.choices
                for e in c.choices[0].logprobs.content]
    for entries in (whole, streamed):
        assert [e.token for e in entries] == [tokenizer.decode([t]) for t in generated]
        assert all(e.bytes == list(e.token.encode()) for e in entries)
        torch.testing.assert_close(torch.tensor([e.logprob for e in entries]), ref[range(NEW_TOKENS), generated],
                                   rtol=0, atol=1e-4)
        for row, entry in enumerate(entries):
            values, best = ref[row].topk(2)
            assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in best.tolist()]
            torch.testing.assert_close(torch.tensor([t.logprob for t in entry.top_logprobs]), values, rtol=0,
                                       atol=1e-4)
    assert server.client.chat.completions.create(**fields | {"logprobs": False, "top_logprobs": None}
                                                 ).choices[0].logprobs is None


def test_token_logprobs_in_process():
    """``token_logprobs`` on hand-made logits: the chosen token's log probability and the top ones, sorted."""
    from moe_offload.serve.logprobs import token_logprobs

    logits = torch.tensor([0.0, 3.0, 2.0, 1.0])
    expected = torch.log_softmax(logits, dim=-1)
    got = token_logprobs(logits, 2, top=2)
    assert got.token == 2 and got.logprob == pytest.approx(float(expected[2]))
    assert [t for t, _ in got.top] == [1, 2] and [v for _, v in got.top] == pytest.approx(expected[[1, 2]].tolist())
    assert token_logprobs(logits, 0, top=0).top == ()


def test_request_fields_reach_the_sampler(tokenizer):
    from moe_offload.serve.openai_api import ServedModel, sampling_params

    served = ServedModel(MODEL, tokenizer, 1024, 0)
    params = sampling_params({"max_tokens": 3, "top_k": 5, "frequency_penalty": 0.5, "presence_penalty": -1,
                              "logit_bias": {"7": -100}, "logprobs": None, "top_logprobs": None}, served, 4, None)
    assert (params.top_k, params.frequency_penalty, params.presence_penalty) == (5, 0.5, -1.0)
    assert params.logit_bias == ((7, -100.0),) and not params.greedy and params.logprobs is None
    assert sampling_params({"logprobs": 3}, served, 4, 5).logprobs == 3
    assert sampling_params({"logprobs": 0}, served, 4, 5).logprobs == 0
    assert sampling_params({"logprobs": True}, served, 4, 5, chat=True).logprobs == 0
    assert sampling_params({"logprobs": True, "top_logprobs": 4}, served, 4, 5, chat=True).logprobs == 4
    assert sampling_params({"logprobs": False}, served, 4, 5, chat=True).logprobs is None


def test_sampling_adjustments_in_process():
    """``sample``'s logit bias, penalties and top-k on hand-made logits."""
    from moe_offload.serve.engine import SamplingParams, sample

    logits = torch.tensor([0.0, 3.0, 2.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(4), gen) == 1
    assert sample(logits, SamplingParams(4, logit_bias=((3, 5.0),)), gen) == 3
    assert sample(logits, SamplingParams(4, presence_penalty=1.5), gen, [1]) == 2    # 3 - 1.5 < 2
    assert sample(logits, SamplingParams(4, frequency_penalty=0.4), gen, [1, 1]) == 1  # 3 - 2 * 0.4 = 2.2 > 2
    assert sample(logits, SamplingParams(4, frequency_penalty=0.6), gen, [1, 1]) == 2  # 3 - 2 * 0.6 = 1.8 < 2
    assert {sample(logits, SamplingParams(4, temperature=2.0, top_k=1), gen) for _ in range(20)} == {1}
    assert SamplingParams(4).greedy and not SamplingParams(4, presence_penalty=0.1).greedy


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # open without the key
    server.complete()
    metrics = server.metrics()
    for name in ("moe_offload_queue_depth", "moe_offload_running_sequences", "moe_offload_expert_cache_hit_rate",
                 "moe_offload_expert_copied_bytes_total", "moe_offload_cpu_experts_total",
                 'moe_offload_requests_total{outcome="rejected"}'):
        assert name in metrics
    assert metrics['moe_offload_requests_total{outcome="completed"}'] >= 1
    assert metrics["moe_offload_prompt_tokens_total"] > 0 and metrics["moe_offload_generation_tokens_total"] > 0
    assert 0 <= metrics["moe_offload_expert_cache_hit_rate"] <= 1


GOOD = {"model": MODEL, "prompt": "x = 1", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_INPUTS = [  # id, path, body (bytes: sent as is), status, error param
    ("invalid-json", "/v1/completions", b'{"prompt": "x", ', 400, None),
    ("not-an-object", "/v1/completions", b'["x = 1"]', 400, None),
    ("missing-prompt", "/v1/completions", {"model": MODEL, "max_tokens": 2}, 400, "prompt"),
    ("missing-messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("prompt-wrong-type", "/v1/completions", GOOD | {"prompt": 12}, 400, "prompt"),
    ("prompt-bad-token-ids", "/v1/completions", GOOD | {"prompt": [1, -5]}, 400, "prompt"),
    ("messages-wrong-type", "/v1/chat/completions", CHAT | {"messages": "hi"}, 400, "messages"),
    ("message-without-role", "/v1/chat/completions", CHAT | {"messages": [{"content": "hi"}]}, 400, "messages[0]"),
    ("max-tokens-string", "/v1/completions", GOOD | {"max_tokens": "5"}, 400, "max_tokens"),
    ("max-tokens-zero", "/v1/completions", GOOD | {"max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", "/v1/chat/completions", CHAT | {"max_tokens": -3}, 400, "max_tokens"),
    ("max-tokens-beyond-context", "/v1/completions", GOOD | {"max_tokens": 1024}, 400, "max_tokens"),
    ("prompt-longer-than-context", "/v1/completions", GOOD | {"prompt": [5] * 1100}, 400, "prompt"),
    ("temperature-string", "/v1/completions", GOOD | {"temperature": "hot"}, 400, "temperature"),
    ("temperature-too-high", "/v1/completions", GOOD | {"temperature": 9}, 400, "temperature"),
    ("top-p-zero", "/v1/completions", GOOD | {"top_p": 0}, 400, "top_p"),
    ("n-two", "/v1/completions", GOOD | {"n": 2}, 400, "n"),
    ("stop-number", "/v1/completions", GOOD | {"stop": 5}, 400, "stop"),
    ("seed-float", "/v1/completions", GOOD | {"seed": 1.5}, 400, "seed"),
    ("stream-string", "/v1/completions", GOOD | {"stream": "yes"}, 400, "stream"),
    ("logprobs-too-many", "/v1/completions", GOOD | {"logprobs": 6}, 400, "logprobs"),
    ("logprobs-boolean-on-completions", "/v1/completions", GOOD | {"logprobs": True}, 400, "logprobs"),
    ("top-logprobs-on-completions", "/v1/completions", GOOD | {"top_logprobs": 2}, 400, "top_logprobs"),
    ("chat-logprobs-integer", "/v1/chat/completions", CHAT | {"logprobs": 2}, 400, "logprobs"),
    ("chat-top-logprobs-without-logprobs", "/v1/chat/completions", CHAT | {"top_logprobs": 3}, 400, "top_logprobs"),
    ("chat-top-logprobs-too-many", "/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("frequency-penalty-too-high", "/v1/completions", GOOD | {"frequency_penalty": 3}, 400, "frequency_penalty"),
    ("presence-penalty-string", "/v1/completions", GOOD | {"presence_penalty": "x"}, 400, "presence_penalty"),
    ("top-k-negative", "/v1/completions", GOOD | {"top_k": -1}, 400, "top_k"),
    ("logit-bias-not-a-token", "/v1/completions", GOOD | {"logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit-bias-too-big", "/v1/completions", GOOD | {"logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("stream-options-without-stream", "/v1/completions", GOOD | {"stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("unknown-model", "/v1/completions", GOOD | {"model": "gpt-4"}, 404, "model"),
    ("unknown-model-chat", "/v1/chat/completions", CHAT | {"model": "gpt-4"}, 404, "model"),
    ("unknown-route", "/v1/embeddings", GOOD, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_4xx_error_object_and_the_server_keeps_serving(server, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert server.complete().choices[0].finish_reason == "length"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no-key", "wrong-key"])
def test_api_key_is_required(server, headers):
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics")):
        r = httpx.request(method, server.url + path, json=GOOD, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert server.complete().usage.completion_tokens == 1


def test_official_client_raises_the_matching_errors(server):
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        server.client.completions.create(model=MODEL, prompt="x", max_tokens=1, n=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                              max_tokens=5000)


def test_client_disconnect_mid_stream_leaves_the_batch(server):
    """A stream closed after two chunks is cancelled: the batch shrinks to nothing and serving goes on."""
    before = server.metrics()['moe_offload_requests_total{outcome="cancelled"}']
    stream = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=900, temperature=0,
                                              stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert server.metrics()["moe_offload_running_sequences"] == 1
    stream.close()
    assert server.wait_metric("moe_offload_running_sequences", lambda v: v == 0) == 0
    assert server.wait_metric('moe_offload_requests_total{outcome="cancelled"}', lambda v: v > before) == before + 1
    assert server.complete().choices[0].finish_reason == "length"


def test_whole_answer_client_that_leaves_is_cancelled(server):
    """A client waiting for a whole (non-streamed) answer gives up: the server notices and drops the request."""
    before = server.metrics()['moe_offload_requests_total{outcome="cancelled"}']
    with pytest.raises(httpx.ReadTimeout):  # 1000 greedy tokens of PROMPTS[0] (it has no EOS) take seconds
        server.http.post("/v1/completions", json=GOOD | {"prompt": PROMPTS[0], "max_tokens": 1000, "temperature": 0},
                         timeout=1.0)
    assert server.wait_metric("moe_offload_running_sequences", lambda v: v == 0) == 0
    assert server.wait_metric('moe_offload_requests_total{outcome="cancelled"}', lambda v: v > before) == before + 1
    assert server.complete().choices[0].finish_reason == "length"


def test_full_queue_gets_429_then_serving_resumes(tmp_path_factory):
    """One running sequence and a queue of one: a third request is refused with the OpenAI error shape."""
    busy = _start(tmp_path_factory, "busy", "--max-batch", "1", "--max-queue", "1")
    try:
        running = busy.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=900, temperature=0,
                                                 stream=True)
        next(iter(running))  # it is decoding
        waiting = busy.client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=900, temperature=0,
                                                 stream=True)
        assert busy.wait_metric("moe_offload_queue_depth", lambda v: v == 1) == 1
        with pytest.raises(openai.RateLimitError) as refused:
            busy.complete()
        assert refused.value.status_code == 429 and refused.value.code == "queue_full"
        running.close()
        waiting.close()
        assert busy.wait_metric("moe_offload_running_sequences", lambda v: v == 0) == 0
        assert busy.complete().choices[0].finish_reason == "length"
        assert busy.metrics()['moe_offload_requests_total{outcome="rejected"}'] == 1
        engine = _engine_process_of(busy)
        busy.proc.kill()  # the server dies without a word: its engine process sees its pipe end and exits
        busy.proc.wait(timeout=20)
        _wait_gone(engine, timeout=30)
    finally:
        busy.stop()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _engine_process_of(server: Server) -> int:
    """The server's one child process: its engine, started with multiprocessing's spawn."""
    children = [c for c in _children(server.proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(children) == 1, children
    return children[0]


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_engine_runs_in_its_own_process_and_sigterm_ends_both(tmp_path_factory, reference):
    """By default the model runs in a child process; streams through it give the greedy answers; SIGTERM ends the server and its engine process, with no traceback."""
    server = _start(tmp_path_factory, "sigterm")
    try:
        engine = _engine_process_of(server)
        texts = _in_threads(lambda p: _stream_text(server, p, max_tokens=NEW_TOKENS, temperature=0)[0], PROMPTS[:4])
        assert texts == [reference[p] for p in PROMPTS[:4]]
        server.proc.terminate()
        server.proc.wait(timeout=30)
        _wait_gone(engine, timeout=10)
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()


def test_engine_thread_mode_serves_the_same_answers(tmp_path_factory, reference):
    """``--engine thread`` (the engine in a thread of the HTTP process, no child): the same answers and metrics."""
    server = _start(tmp_path_factory, "thread", "--engine", "thread")
    try:
        assert _children(server.proc.pid) == []
        answers = _in_threads(lambda p: server.client.completions.create(
            model=MODEL, prompt=p, max_tokens=NEW_TOKENS, temperature=0).choices[0].text, PROMPTS[:4])
        assert answers == [reference[p] for p in PROMPTS[:4]]
        assert server.metrics()['moe_offload_requests_total{outcome="completed"}'] == 4
    finally:
        server.stop()


def test_engine_process_that_dies_fails_its_requests(tokenizer):
    """EngineProcess in this process: a request that runs when the engine process is killed gets an error
    update (no client hangs), so does one submitted later, and stop() still returns."""
    import queue

    from moe_offload.loading.config import OffloadConfig
    from moe_offload.serve.engine import GenerationRequest, SamplingParams
    from moe_offload.serve.engine_process import EngineProcess, EngineSpec

    engine = EngineProcess(EngineSpec(MODEL, OffloadConfig(device="cpu", dtype=torch.float32)))
    try:
        ids = tokenizer(PROMPTS[0])["input_ids"]
        running, later = queue.Queue(), queue.Queue()
        job = GenerationRequest(ids, SamplingParams(max_tokens=900), tokenizer, running.put)
        engine.submit(job)
        assert running.get(timeout=60).error is None and engine.running == 1
        assert "moe_offload_running_sequences 1" in engine.metrics_text()
        engine.process.kill()
        while (update := running.get(timeout=30)).error is None:
            pass
        assert update.error == "the engine process has ended" and job.finished and engine.running == 0
        engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=3), tokenizer, later.put))
        assert later.get(timeout=10).error == "the engine process has ended"
    finally:
        engine.stop()
    assert not engine.process.is_alive()


@pytest.mark.parametrize("argv,message", [
    (["serve", "--port", "70000"], "at most 65535"),
    (["serve", "--max-batch", "0"], "at least 1"),
    (["serve", "--model", "/no/such/dir"], "does not exist"),
])
def test_cli_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("moe-offload: error:") and "\n" not in err


def test_cli_port_in_use_exits_2_before_loading(capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-offload: error: cannot listen on 127.0.0.1:") and "\n" not in err


def test_batched_decode_logits_match_each_sequence_alone(model, tokenizer):
    """The batch's rounding: a left-padded batched decode step (three ragged rows; one row dropped, one
    added) gives each row the logits of its sequence run alone. Batching does change float32 rounding
    (the matrix products see other shapes; differences of about 1e-5 on tiny-mixtral), so the logits are
    compared within 1e-4 and the greedy tokens exactly; the server tests above check the text end to end."""
    from transformers import DynamicCache

    from moe_offload.serve.batch import PaddedBatch, cache_argument

    cache_arg = cache_argument(model)
    prompts = [tokenizer(p)["input_ids"] for p in (PROMPTS[0], PROMPTS[7], PROMPTS[3], PROMPTS[13])]
    seqs, batch = [], PaddedBatch()

    def admit(ids):
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=torch.tensor([ids]), logits_to_keep=1, **{cache_arg: cache}).logits[0, -1]
        batch.add(cache, int(logits.argmax()))
        seqs.append(ids + [int(logits.argmax())])

    with torch.inference_mode():
        for ids in prompts[:3]:
            admit(ids)
        for step in range(4):
            if step == 2:
                batch.keep([0, 2])
                del seqs[1]
                admit(prompts[3])
            logits = model(**batch.step_inputs(), **{cache_arg: batch.cache}).logits[:, -1]  # [B, V]
            for row, seq in enumerate(seqs):
                alone = model(input_ids=torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(logits[row], alone, rtol=1e-4, atol=1e-4)
                assert int(logits[row].argmax()) == int(alone.argmax())
            batch.last_tokens = logits.argmax(dim=-1)
            for row, seq in enumerate(seqs):
                seq.append(int(batch.last_tokens[row]))
    assert batch.length == max(len(s) for s in seqs) - 1  # padding columns of the dropped row were cut


def test_engine_fails_a_broken_step_and_keeps_serving(model, tokenizer):
    """A forward that raises fails the requests it ran (an error update each), then the next one runs."""
    import queue

    from moe_offload.serve.engine import BatchEngine, GenerationRequest, SamplingParams

    class BreaksOnce:
        def __init__(self):
            self.broken = False

        def __call__(self, **inputs):
            if not self.broken:
                self.broken = True
                raise RuntimeError("device lost")
            return model(**inputs)

        def __getattr__(self, name):
            return getattr(model, name)

    engine = BatchEngine(model, tokenizer)
    engine.model = BreaksOnce()
    updates = queue.Queue()
    engine.start()
    try:
        for prompt in PROMPTS[:2]:
            engine.submit(GenerationRequest(tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=3), tokenizer,
                                            updates.put))
            while (update := updates.get(timeout=60)).finish_reason is None and update.error is None:
                pass
            assert (update.error, update.finish_reason) == (
                ("generation failed: device lost", None) if prompt == PROMPTS[0] else (None, "length"))
    finally:
        engine.stop()
    assert engine.counters.requests["failed"] == 1 and engine.counters.requests["completed"] == 1


class BytesTokenizer:
    """Tokens are byte strings; decoding joins them as UTF-8 (an unfinished character decodes as U+FFFD)."""

    def decode(self, tokens, skip_special_tokens=True):
        return b"".join(tokens).decode("utf-8", errors="replace")


@pytest.mark.parametrize("tokens,stop,pieces,stopped", [
    ([b"a", b"E", b"N", b"Db"], ("END",), ["", "", "a", ""], True),           # a stop split over tokens
    ([b"ab", b"EN", b"c"], ("END",), ["", "ab", "E"], False),                 # a partial stop that was not one
    ([b"x", b"\xc3", b"\xa9", b"!"], (), ["x", "", "\u00e9", "!"], False),      # a character split over tokens
    ([b"STOP", b"more"], ("STOP", "never"), ["", ""], True),                   # the stop at the very start
], ids=["stop-over-tokens", "almost-a-stop", "split-character", "stop-first"])
def test_incremental_text_holds_back_stops_and_split_characters(tokens, stop, pieces, stopped):
    from moe_offload.serve.text import IncrementalText

    text = IncrementalText(BytesTokenizer(), stop)
    released = []
    for token in tokens:
        released.append(text.add(token))
        if text.stopped:
            break
    assert released == pieces[:len(released)] and text.stopped == stopped
    whole = "".join(released) + text.finish()
    full = b"".join(tokens).decode()
    assert whole == (full[:min(full.find(s) for s in stop if s in full)] if stopped else full)
