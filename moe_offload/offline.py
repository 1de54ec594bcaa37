"""Offline batch generation: many prompts through the serving engine's step loop, no server.

``generate_batch(model, prompts)`` runs every prompt with continuous batching over a large batch (the
engine of ``moe_offload.serve``: waiting prompts are prefilled together, each forward runs every MoE
layer once over all the step's tokens, so an expert copied for one step serves every sequence of it)
and returns one ``BatchResult`` per prompt, in input order. The batch size comes from a memory plan
(``plan_batch``): each sequence's KV cache at its longest, within the device's KV reserve (CUDA) or
half the available host memory (CPU). ``iter_batch`` yields the results in input order as soon as they
are known, for writers that save as they go (``moe-offload batch``).

A prompt is a string, a list of token ids, or an OpenAI-style request object (``prompt`` or
``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ... and an optional
``id``), checked by the server's own request rules; a bad one raises MoEOffloadError naming it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .errors import MoEOffloadError
from .loading.adapters import adapter_for
from .loading.budget import format_bytes
from .loading.tokenizer import load_tokenizer
from .serve.engine import BatchEngine, GenerationRequest, SamplingParams, Update
from .serve.microbatch import AttentionSplit, micro_batched_attention
from .serve.openai_api import ApiError, ServedModel, chat_prompt, completion_prompt, sampling_params

DEFAULT_MAX_TOKENS = 128
MAX_BATCH = 256  # sequences run together at most, whatever memory allows


@dataclass(frozen=True)
class BatchResult:
    """One prompt's answer: its ``id`` (None when the input had none), text, why it ended, token counts."""

    id: str | int | None
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def to_json(self) -> dict:
        """The output line: ``id`` when the input had one, ``text``, ``finish_reason``, ``usage``."""
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens}
        head = {} if self.id is None else {"id": self.id}
        return head | {"text": self.text, "finish_reason": self.finish_reason, "usage": usage}


@dataclass(frozen=True)
class BatchJob:
    """One prompt ready to run: where it came from (for messages), its id, tokens and sampling."""

    source: str
    id: str | int | None
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class BatchPlan:
    """How many sequences run together (each one's KV cache at its longest within the memory for KV), and
    how many of them attend at once (None: the whole batch, KV where the model is)."""

    batch_size: int
    attention_rows: int | None
    kv_bytes_per_token: int
    tokens_per_sequence: int  # the longest prompt + the most tokens a prompt may generate
    kv_budget_bytes: int
    kv_memory: str  # where the KV cache lives: "device KV reserve" or "host memory"

    def describe(self) -> str:
        per_sequence = self.kv_bytes_per_token * self.tokens_per_sequence
        split = ("" if self.attention_rows is None else
                 f"; attention in micro-batches of {self.attention_rows} sequences, KV in page-locked host memory")
        return (f"batch of {self.batch_size} sequences: KV cache {format_bytes(per_sequence)} per sequence "
                f"({self.tokens_per_sequence} tokens x {format_bytes(self.kv_bytes_per_token)}), "
                f"{format_bytes(self.kv_budget_bytes)} of {self.kv_memory} for it{split}")


def available_host_memory() -> int:
    """Bytes of host memory available now (MemAvailable on Linux, free pages elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_batch(model, jobs: Sequence[BatchJob], max_batch: int = MAX_BATCH) -> BatchPlan:
    """The batch size for ``jobs`` on ``model``: as many sequences as the KV memory holds at their longest (at
    most ``max_batch`` and the number of jobs). On the CPU the KV cache is in host memory (half of what is
    available now). On CUDA it stays in the device's KV reserve when the whole batch fits there; otherwise it
    lives in page-locked host memory and attention runs in micro-batches whose keys and values of one layer
    fit in the KV reserve."""
    per_token = adapter_for(model.config).kv_bytes_per_token(model.config, model.dtype.itemsize)
    longest = max(len(j.prompt_ids) for j in jobs) + max(j.params.max_tokens for j in jobs)
    wanted = min(max_batch, len(jobs))
    per_sequence = max(1, per_token * longest)
    rows = None  # the whole batch attends at once
    if model.device.type == "cuda":
        reserve = model.offload.plan.kv_reserve_bytes
        if reserve // per_sequence >= wanted:
            return BatchPlan(wanted, None, per_token, longest, reserve, "device KV reserve")
        per_layer = max(1, per_sequence // model.config.num_hidden_layers)
        rows = max(1, reserve // (2 * per_layer))  # one layer's KV of the micro-batch, and its copy with the new
    budget = available_host_memory() // 2
    fits = budget // per_sequence
    if fits < 1:
        raise MoEOffloadError(f"one sequence of {longest} tokens needs {format_bytes(per_sequence)} of KV cache, "
                              f"more than the {format_bytes(budget)} of host memory; lower max_tokens or shorten "
                              "the prompts")
    batch = min(fits, wanted)
    return BatchPlan(batch, None if rows is None else min(rows, batch), per_token, longest, budget, "host memory")


def model_tokenizer(model):
    """The tokenizer saved beside ``model``'s weights."""
    directory = model.config._name_or_path
    try:
        return load_tokenizer(directory)
    except (OSError, ValueError):
        raise MoEOffloadError(f"{directory} has no tokenizer files; pass the tokenizer, or token ids as "
                              "prompts") from None


def served_model(model, tokenizer) -> ServedModel:
    """The request rules' view of ``model``: its tokenizer and context length."""
    return ServedModel(name=Path(str(model.config._name_or_path)).name, tokenizer=tokenizer,
                       context_length=model.config.max_position_embeddings, created=int(time.time()))


def make_job(prompt, served: ServedModel, source: str, defaults: dict) -> BatchJob:
    """One prompt (string, token ids or OpenAI-style request object) checked and tokenized; ``defaults``
    fill the sampling fields it leaves out. MoEOffloadError naming ``source`` when it is bad."""
    body = prompt if isinstance(prompt, dict) else {"prompt": prompt}
    body = {k: v for k, v in defaults.items() if v is not None} | {k: v for k, v in body.items() if v is not None}
    try:
        if "prompt" not in body and "messages" not in body:
            raise ApiError(400, "it has neither 'prompt' nor 'messages'", "prompt")
        ids = chat_prompt(body, served) if "messages" in body else completion_prompt(body, served)
        params = sampling_params(body, served, len(ids), None)
    except ApiError as err:
        raise MoEOffloadError(f"{source}: {err.message}; fix or remove it") from None
    job_id = body.get("id")
    if job_id is not None and not isinstance(job_id, (str, int)):
        raise MoEOffloadError(f"{source}: 'id' must be a string or an integer; fix or remove it")
    return BatchJob(source, job_id, ids, params)


class _Collector:
    """The sink of one request: its text pieces, then its BatchResult (or the engine's error); tells
    ``finished`` (a queue) its index when either is known."""

    def __init__(self, index: int, job: BatchJob, finished: queue.SimpleQueue) -> None:
        self.index, self.job, self.finished = index, job, finished
        self.pieces: list[str] = []
        self.result: BatchResult | None = None
        self.error: str | None = None

    def __call__(self, update: Update) -> None:
        self.pieces.append(update.text)
        if update.error is not None:
            self.error = update.error
        elif update.finish_reason is not None:
            self.result = BatchResult(self.job.id, "".join(self.pieces), update.finish_reason,
                                      update.prompt_tokens, update.completion_tokens)
        else:
            return
        self.finished.put(self.index)


def run_jobs(model, tokenizer, jobs: Sequence[BatchJob], batch_size: int, prefill_chunk: int = 512,
             progress: bool = True, attention_rows: int | None = None) -> Iterator[BatchResult]:
    """Run ``jobs`` on the engine's step loop, ``batch_size`` sequences at a time (attention in micro-batches of
    ``attention_rows`` over host-resident KV when given); yield their results in input order as soon as every
    earlier one is done. A progress bar shows sequences done, tokens/s, ETA."""
    split = contextlib.nullcontext() if attention_rows is None else micro_batched_attention(
        model, AttentionSplit.for_model(model, attention_rows))
    with split:
        yield from _step_loop(model, tokenizer, jobs, batch_size, prefill_chunk, progress)


def submission_order(lengths: Sequence[int], window: int) -> list[int]:
    """The order jobs are handed to the engine: each run of ``window`` consecutive jobs (the batch size)
    shortest prompt first. A prefill forward pads its rows to the longest prompt among them (and takes rows
    while rows x longest stays within its token budget), so prompts of similar length prefilled together
    waste less compute; windows keep the input's order between them, so answers, written in input order,
    never wait on a job more than a window later. Stable: equal lengths keep their input order."""
    window = max(1, window)
    order = []
    for start in range(0, len(lengths), window):
        order += sorted(range(start, min(start + window, len(lengths))), key=lambda i: lengths[i])
    return order


def _step_loop(model, tokenizer, jobs: Sequence[BatchJob], batch_size: int, prefill_chunk: int,
               progress: bool) -> Iterator[BatchResult]:
    """The engine's own thread runs the steps (as in the server: the model computes off the caller's thread,
    which here only waits, writes and draws the bar)."""
    engine = BatchEngine(model, tokenizer, max_batch=batch_size, max_queue=len(jobs),
                         prefill_chunk=prefill_chunk, prefill_tokens=max(4096, 8 * prefill_chunk))
    finished: queue.SimpleQueue = queue.SimpleQueue()
    collectors = [_Collector(i, job, finished) for i, job in enumerate(jobs)]
    for i in submission_order([len(job.prompt_ids) for job in jobs], batch_size):
        engine.submit(GenerationRequest(jobs[i].prompt_ids, jobs[i].params, tokenizer, collectors[i]))
    flushed, start = 0, time.perf_counter()
    engine.start()
    try:
        with tqdm(total=len(jobs), desc="batch", unit="seq", disable=not progress) as bar:
            while flushed < len(jobs):
                done = collectors[finished.get()]
                if done.error is not None:
                    raise MoEOffloadError(f"{done.job.source}: {done.error}")
                bar.update(1)
                bar.set_postfix_str(f"{engine.counters.completion_tokens / (time.perf_counter() - start):.1f} tok/s",
                                    refresh=False)
                while flushed < len(jobs) and collectors[flushed].result is not None:
                    yield collectors[flushed].result
                    flushed += 1
    finally:
        engine.stop()


def iter_batch(model, prompts: Sequence, tokenizer=None, *, max_tokens: int = DEFAULT_MAX_TOKENS,
               temperature: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
               batch_size: int | None = None, prefill_chunk: int = 512, attention_rows: int | None = None,
               progress: bool = True) -> Iterator[BatchResult]:
    """``generate_batch``'s results one by one, in input order, as soon as each is known."""
    tokenizer = tokenizer or model_tokenizer(model)
    served = served_model(model, tokenizer)
    defaults = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stop": list(stop) or None}
    jobs = [make_job(p, served, f"prompt {i}", defaults) for i, p in enumerate(prompts)]
    if not jobs:
        return iter(())
    if batch_size is None:
        plan = plan_batch(model, jobs)
        batch_size, attention_rows = plan.batch_size, attention_rows or plan.attention_rows
        if progress:
            print(f"[moe-offload] {plan.describe()}", file=sys.stderr, flush=True)
    return run_jobs(model, tokenizer, jobs, batch_size, prefill_chunk, progress, attention_rows)


def generate_batch(model, prompts: Sequence, tokenizer=None, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                   temperature: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                   batch_size: int | None = None, prefill_chunk: int = 512, attention_rows: int | None = None,
                   progress: bool = True) -> list[BatchResult]:
    """Every prompt of ``prompts`` (strings, token id lists or OpenAI-style request objects, whose own
    fields override the keyword defaults) generated with continuous batching; the results in input order.
    Greedy (temperature 0) answers equal ``model.generate`` on each prompt alone. ``batch_size`` None:
    chosen by ``plan_batch`` and printed (with ``progress``). ``attention_rows``: sequences per attention
    micro-batch over a host-resident KV cache (None: the plan's; the whole batch where the KV fits)."""
    return list(iter_batch(model, prompts, tokenizer, max_tokens=max_tokens, temperature=temperature, seed=seed,
                           stop=stop, batch_size=batch_size, prefill_chunk=prefill_chunk,
                           attention_rows=attention_rows, progress=progress))
