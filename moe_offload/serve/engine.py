"""BatchEngine: runs every request on one model with continuous batching, in a thread (the server) or
step by step (``generate_batch``).

Requests wait in a bounded queue. At each step boundary the engine admits waiting requests (up to
``max_batch`` sequences prefilling or running) and runs one step: one left-padded forward that feeds every
prefilling sequence its next chunk of prompt (at most ``prefill_chunk`` tokens each, so a long prompt is
prefilled over several steps and never stalls the running decodes for long; at most ``prefill_tokens``
padded tokens in that forward), then one batched decode forward for all running sequences. A sequence whose
prompt is in samples its first token and joins the decoding batch. A sequence that finishes (EOS, a stop
string, ``max_tokens``) or whose client went away leaves the batch at that boundary and its KV memory is
freed, so a long request never holds back short ones, and each MoE layer runs once per forward over every
token of it: the experts it copies serve every sequence of the step.

Why not transformers' own continuous batching (``ContinuousBatchingManager``, what ``transformers
serve`` uses)? It does run this offloaded model on the CPU and its greedy tokens match, but sampling
is one setting for the whole manager (``do_sample`` and the random seed are global, temperature 0
cannot be mixed with sampled requests) and there is no per-request seed, which an OpenAI server must
honour per request. Its paged cache is also sized up front from free memory. The step loop here is
small: left-padded ``DynamicCache`` batches (``PaddedBatch``) for the prefilling and the decoding
sequences, per-row sampling with a per-request generator.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .batch import PaddedBatch, cache_argument
from .logprobs import TokenLogprobs, token_logprobs
from .text import IncrementalText

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """What one request asked for: ``temperature`` 0 is greedy; ``stop`` strings end the text.
    ``logit_bias`` ((token, bias) pairs) and the penalties adjust the logits before either greedy or sampled
    choice; the penalties count the tokens generated so far (not the prompt's), as OpenAI describes them:
    ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``. ``top_k`` 0 keeps every token.
    ``logprobs`` None computes no log probabilities; k >= 0 sends each token's and the k most likely."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def greedy(self) -> bool:
        """The row's token is the argmax of its raw logits (the batch's shared fast path)."""
        return self.temperature == 0 and not self.adjusts_logits


@dataclass(frozen=True)
class Update:
    """What a request's sink receives after each generated token (and once more on failure)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", or None while running
    error: str | None = None
    logprobs: TokenLogprobs | None = None  # the token's, when the request asked for them


class QueueFull(Exception):
    """The bounded queue of waiting requests is full."""


class GenerationRequest:
    """One prompt being generated: its parameters, its text so far and where its updates go."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, sink: Callable[[Update], None]):
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.text = IncrementalText(tokenizer, params.stop)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.cancelled = False  # set by the server when the client goes away
        self.finished = False  # set by the engine once the last update is sent
        self.prefilled = 0  # prompt tokens already in the KV cache

    def next_chunk(self, limit: int) -> list[int]:
        """The next at most ``limit`` prompt tokens to prefill."""
        return self.prompt_ids[self.prefilled:self.prefilled + limit]

    @property
    def completion_tokens(self) -> int:
        return len(self.text.tokens)


def adjusted(logits: torch.Tensor, params: SamplingParams, generated: Sequence[int]) -> torch.Tensor:
    """``logits`` [V] with the request's logit bias and penalties applied (a float32 copy), or as they are."""
    if not params.adjusts_logits:
        return logits
    logits = logits.float().clone()                                                  # [V]
    for token, bias in params.logit_bias:
        logits[token] += bias
    if generated and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(generated), minlength=logits.numel())[: logits.numel()].float()  # [V]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           generated: Sequence[int] = ()) -> int:
    """One token from ``logits`` [V] after ``generated`` tokens: the logits adjusted (bias, penalties), then
    argmax at temperature 0, else temperature, top-k and top-p sampling."""
    logits = adjusted(logits, params, generated)
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [V]
    if 0 < params.top_k < probs.numel():
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(0, probs.topk(params.top_k).indices, True)
        probs = probs.masked_fill(~keep, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p  # mass before it already reaches top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class StepLimits:
    """How much one engine step may do: ``max_batch`` sequences prefilling or decoding, ``max_queue``
    requests waiting, ``prefill_chunk`` prompt tokens of one sequence per step, ``prefill_tokens`` padded
    tokens in one prefill forward (a sequence already prefilling always gets its next chunk)."""

    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int = 512
    prefill_tokens: int = 4096


@dataclass
class EngineCounters:
    """Totals since the server started, for /metrics."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("completed", "cancelled", "failed", "rejected"), 0))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefills: int = 0  # sequences whose prompt is in
    prefill_steps: int = 0  # prefill forwards (each feeds one chunk of every prefilling sequence)
    decode_steps: int = 0
    decode_rows: int = 0  # sum of the batch size over decode steps


class BatchEngine:
    """Runs requests on ``model``: in a background thread after ``start`` (``submit`` and ``cancel`` are
    thread-safe), or by calling ``step`` until ``idle`` (no thread)."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 512,
                 prefill_tokens: int = 4096) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.limits = StepLimits(max_batch, max_queue, prefill_chunk, max(prefill_tokens, prefill_chunk))
        eos = model.generation_config.eos_token_id
        self._cache_arg = cache_argument(model)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.counters = EngineCounters()
        self._waiting: deque[GenerationRequest] = deque()
        self._wake = threading.Condition()
        self._prefilling: list[GenerationRequest] = []
        self._filling = PaddedBatch()  # the prefilling sequences' KV cache, rows as in _prefilling
        self._running: list[GenerationRequest] = []
        self._batch = PaddedBatch()  # the decoding sequences' KV cache, rows as in _running
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="moe-offload-engine", daemon=True)

    @property
    def max_batch(self) -> int:
        return self.limits.max_batch

    @property
    def max_queue(self) -> int:
        return self.limits.max_queue

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running) + len(self._prefilling)

    @property
    def idle(self) -> bool:
        """Nothing waits, prefills or decodes."""
        return not self._waiting and not self._prefilling and not self._running

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; requests still waiting or running get a failure update."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request``; raises QueueFull when ``max_queue`` requests already wait."""
        with self._wake:
            if len(self._waiting) >= self.limits.max_queue:
                self.counters.requests["rejected"] += 1
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: GenerationRequest) -> None:
        """The client is gone: drop ``request`` from the queue, or from the batch at the next boundary."""
        request.cancelled = True
        with self._wake:
            if request in self._waiting:
                self._waiting.remove(request)
                self.counters.requests["cancelled"] += 1

    def step(self) -> None:
        """One step: admit waiting requests, feed the prefilling ones their next chunk, decode one token
        for every running one. A failed forward fails the sequences it ran and the engine goes on."""
        self._admit()
        for phase, run in (("prefill", self._prefill_step), ("decode", self._decode_step)):
            try:
                run()
            except Exception as err:  # fail those sequences, keep serving
                log.exception("%s step failed", phase)
                self._fail_rows(phase, f"generation failed: {err}")

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                self.step()
                if self._prefilling or self._running:
                    continue
                with self._wake:
                    if not self._waiting and not self._stopping:
                        self._wake.wait(timeout=1.0)
        self._fail_rows("prefill", "the server is shutting down")
        self._fail_rows("decode", "the server is shutting down")
        for request in list(self._waiting):
            self._fail(request, "the server is shutting down")

    def _fail_rows(self, phase: str, message: str) -> None:
        """Fail every sequence of one phase's batch ('prefill' or 'decode') and empty that batch."""
        requests = self._prefilling if phase == "prefill" else self._running
        for request in requests:
            self._fail(request, message)
        if phase == "prefill":
            self._prefilling, self._filling = [], PaddedBatch()
        else:
            self._running, self._batch = [], PaddedBatch()

    def _admit(self) -> None:
        """Move waiting requests into the prefilling batch while ``max_batch`` sequences are not all taken
        and the prefill forward stays within ``prefill_tokens`` padded tokens (at least one sequence)."""
        limits, admitted = self.limits, []
        width = max((len(r.next_chunk(limits.prefill_chunk)) for r in self._prefilling), default=0)
        while self.running + len(admitted) < limits.max_batch:
            with self._wake:
                if not self._waiting:
                    break
                chunk = len(self._waiting[0].next_chunk(limits.prefill_chunk))
                rows = len(self._prefilling) + len(admitted) + 1
                if rows > 1 and rows * max(width, chunk) > limits.prefill_tokens:
                    break
                admitted.append(self._waiting.popleft())
            width = max(width, chunk)
        if admitted:
            self._prefilling += admitted
            self._filling.merge(PaddedBatch(len(admitted)))

    def _prefill_step(self) -> None:
        """Feed every prefilling sequence its next chunk in one forward; those whose prompt is now in
        sample their first token and join the decoding batch."""
        self._keep_prefilling([r for r in self._prefilling if not r.cancelled])
        if not self._prefilling:
            return
        chunks = [r.next_chunk(self.limits.prefill_chunk) for r in self._prefilling]
        inputs = {k: v.to(self.model.device) for k, v in self._filling.feed(chunks).items()}
        inputs[self._cache_arg] = self._filling.cache_for(self.model.config)
        logits = self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1].cpu()  # [B, V]
        self.counters.prefill_steps += 1
        for request, chunk in zip(self._prefilling, chunks):
            request.prefilled += len(chunk)
        done = [row for row, r in enumerate(self._prefilling) if r.prefilled == len(r.prompt_ids)]
        if not done:
            return
        joined, requests = self._filling.take(done), [self._prefilling[row] for row in done]
        self._prefilling = [r for row, r in enumerate(self._prefilling) if row not in set(done)]
        self.counters.prefills += len(done)
        self.counters.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
        joined.last_tokens = self._choose(logits[done], requests)
        kept = [row for row, (r, t) in enumerate(zip(requests, joined.last_tokens.tolist()))
                if not self._emit(r, t, logits[done[row]])]
        joined.keep(kept)
        self._batch.merge(joined)
        self._running += [requests[row] for row in kept]

    def _decode_step(self) -> None:
        """One token for every running sequence; finished and cancelled ones leave the batch."""
        self._keep([r for r in self._running if not r.cancelled])
        if not self._running:
            return
        inputs = {k: v.to(self.model.device) for k, v in self._batch.step_inputs().items()}
        inputs[self._cache_arg] = self._batch.cache
        logits = self.model(**inputs, use_cache=True).logits[:, -1].cpu()  # [B, V]
        self.counters.decode_steps += 1
        self.counters.decode_rows += len(self._running)
        tokens = self._choose(logits, self._running)
        self._batch.last_tokens = tokens
        self._keep([r for r, t, row in zip(self._running, tokens.tolist(), logits) if not self._emit(r, t, row)])

    @staticmethod
    def _choose(logits: torch.Tensor, requests: list[GenerationRequest]) -> torch.Tensor:
        """Each row's next token from ``logits`` [B, V]: the argmax for greedy rows, else the request's sampler."""
        tokens = logits.argmax(dim=-1)  # [B] the greedy rows' tokens
        for row, request in enumerate(requests):
            if not request.params.greedy:
                tokens[row] = sample(logits[row], request.params, request.generator, request.text.tokens)
        return tokens

    def _keep_prefilling(self, requests: list[GenerationRequest]) -> None:
        """Keep only ``requests`` among the prefilling ones (cancelled ones are counted)."""
        if len(requests) == len(self._prefilling):
            return
        self.counters.requests["cancelled"] += len(self._prefilling) - len(requests)
        kept = {id(r) for r in requests}
        self._filling.keep([i for i, r in enumerate(self._prefilling) if id(r) in kept])
        self._prefilling = requests

    def _keep(self, requests: list[GenerationRequest]) -> None:
        """Keep only ``requests`` in the batch (a subsequence of the running ones)."""
        if len(requests) == len(self._running):
            return
        kept = {id(r) for r in requests}
        for request in self._running:
            if id(request) not in kept and request.cancelled and not request.finished:
                self.counters.requests["cancelled"] += 1
        rows = [i for i, r in enumerate(self._running) if id(r) in kept]
        self._batch.keep(rows)
        self._running = requests

    def _emit(self, request: GenerationRequest, token: int, logits: torch.Tensor) -> bool:
        """Hand ``token``'s text (and log probability, chosen from ``logits`` [V]) to the request's sink; True
        when the request is finished."""
        logprobs = None
        if request.params.logprobs is not None:
            used = adjusted(logits, request.params, request.text.tokens)  # [V] what the token was chosen from
            logprobs = token_logprobs(used, token, request.params.logprobs)
        piece = request.text.add(token)
        self.counters.completion_tokens += 1
        if request.text.stopped or token in self.eos_ids:
            reason = "stop"
        elif request.completion_tokens >= request.params.max_tokens:
            reason = "length"
        else:
            reason = None
        if reason is not None:
            piece += request.text.finish()
            request.finished = True
            self.counters.requests["completed"] += 1
        self._send(request, Update(piece, len(request.prompt_ids), request.completion_tokens, reason,
                                   logprobs=logprobs))
        return reason is not None

    def _fail(self, request: GenerationRequest, message: str) -> None:
        request.finished = True
        self.counters.requests["failed"] += 1
        self._send(request, Update("", len(request.prompt_ids), request.completion_tokens, error=message))

    @staticmethod
    def _send(request: GenerationRequest, update: Update) -> None:
        try:
            request.sink(update)
        except RuntimeError:  # the server's event loop is closed: nobody listens any more
            request.cancelled = True
