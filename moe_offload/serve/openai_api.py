"""The OpenAI wire format: request bodies checked and turned into prompt tokens plus SamplingParams,
and the JSON of responses, stream chunks and errors.

Bad input raises ApiError, which the server sends as ``{"error": {"message", "type", "param",
"code"}}`` with its HTTP status. The sampling fields are honoured (``temperature``, ``top_p``, ``top_k``,
``seed``, ``stop``, ``frequency_penalty``, ``presence_penalty``, ``logit_bias``,
``stream_options.include_usage``, ``logprobs``: an integer on /v1/completions, ``logprobs`` + ``top_logprobs`` on
chat, see ``logprobs.py``).
Fields outside the API this server does not know are ignored, as OpenAI's are.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .engine import SamplingParams, Update
from .logprobs import MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS, LogprobsShape, TokenLogprobs

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """The one model this server serves: its public name, tokenizer and context length."""

    name: str
    tokenizer: object
    context_length: int
    created: int


def _field(body: dict, name: str, types: tuple[type, ...], default=None, what: str = ""):
    """``body[name]`` if it has one of ``types`` (bool is not a number), ``default`` if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        expected = what or " or ".join(t.__name__ for t in types)
        raise ApiError(400, f"'{name}' must be {expected}, got {type(value).__name__}", name, "invalid_type")
    return value


def _check_range(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ApiError(400, f"'{name}' {message}", name, "invalid_value")


def check_model(body: dict, served: ServedModel) -> None:
    """The ``model`` field, when given, must name the served model."""
    name = _field(body, "model", (str,), served.name)
    if name != served.name:
        raise ApiError(404, f"The model '{name}' does not exist; this server serves '{served.name}'",
                       "model", "model_not_found")


def sampling_params(body: dict, served: ServedModel, prompt_tokens: int, default_max: int | None,
                    chat: bool = False) -> SamplingParams:
    """The request's sampling fields (of a chat request with ``chat``), checked against the context left after
    ``prompt_tokens``."""
    room = served.context_length - prompt_tokens
    if room <= 0:
        raise ApiError(400, f"This model's maximum context length is {served.context_length} tokens, and the "
                            f"prompt has {prompt_tokens}", "prompt" if "prompt" in body else "messages",
                       "context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, name, (int,), min(default_max or room, room), "an integer")
    _check_range(max_tokens >= 1, name, f"must be at least 1, got {max_tokens}")
    if max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {served.context_length} tokens; you asked "
                            f"for {prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} to "
                            "generate)", name, "context_length_exceeded")
    temperature = float(_field(body, "temperature", (int, float), 1.0, "a number"))
    _check_range(0 <= temperature <= 2, "temperature", f"must be between 0 and 2, got {temperature}")
    top_p = float(_field(body, "top_p", (int, float), 1.0, "a number"))
    _check_range(0 < top_p <= 1, "top_p", f"must be in (0, 1], got {top_p}")
    top_k = _field(body, "top_k", (int,), 0, "an integer")
    _check_range(top_k >= 0, "top_k", f"must be 0 (off) or more, got {top_k}")
    penalties = {}
    for name in ("frequency_penalty", "presence_penalty"):
        penalties[name] = float(_field(body, name, (int, float), 0.0, "a number"))
        _check_range(-2 <= penalties[name] <= 2, name, f"must be between -2 and 2, got {penalties[name]}")
    n = _field(body, "n", (int,), 1, "an integer")
    _check_range(n == 1, "n", f"must be 1 on this server (one choice per request), got {n}")
    _field(body, "stream", (bool,), False, "a boolean")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          seed=_field(body, "seed", (int,), None, "an integer"), stop=_stop_strings(body),
                          logit_bias=_logit_bias(body, len(served.tokenizer)),
                          logprobs=_chat_logprobs(body) if chat else _completion_logprobs(body), **penalties)


def _completion_logprobs(body: dict) -> int | None:
    """/v1/completions' ``logprobs``: how many most likely tokens to send beside each chosen one (None: off)."""
    if body.get("top_logprobs") is not None:
        raise ApiError(400, "'top_logprobs' is a chat field; /v1/completions takes 'logprobs' (an integer)",
                       "top_logprobs", "invalid_value")
    top = _field(body, "logprobs", (int,), None, "an integer")
    _check_range(top is None or 0 <= top <= MAX_COMPLETION_LOGPROBS, "logprobs",
                 f"must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {top}")
    return top


def _chat_logprobs(body: dict) -> int | None:
    """Chat's ``logprobs`` (a boolean) and ``top_logprobs`` (how many most likely tokens, which needs it)."""
    wanted = _field(body, "logprobs", (bool,), False, "a boolean")
    top = _field(body, "top_logprobs", (int,), None, "an integer")
    if top is None:
        return 0 if wanted else None
    _check_range(0 <= top <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {top}")
    _check_range(wanted, "top_logprobs", "needs 'logprobs': true")
    return top


def _logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    """``logit_bias``: {"token id": bias in [-100, 100]} as (token, bias) pairs."""
    bias = _field(body, "logit_bias", (dict,), {}, "an object mapping token ids to numbers")
    pairs = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.lstrip("-").isdigit() and 0 <= int(key) < vocab):
            raise ApiError(400, f"'logit_bias' keys must be token ids in [0, {vocab}), got {key!r}", "logit_bias",
                           "invalid_value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' values must be numbers between -100 and 100, got {value!r}",
                           "logit_bias", "invalid_value")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def include_usage(body: dict) -> bool:
    """``stream_options.include_usage``: a last stream chunk with the usage and no choices."""
    options = _field(body, "stream_options", (dict,), {}, "an object")
    if options and not body.get("stream"):
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options",
                       "invalid_value")
    return bool(_field(options, "include_usage", (bool,), False, "a boolean"))


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = _field(body, "stop", (str, list), (), "a string or a list of strings")
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    _check_range(len(stop) <= MAX_STOP_STRINGS, "stop", f"takes at most {MAX_STOP_STRINGS} strings")
    return stop


def completion_prompt(body: dict, served: ServedModel) -> list[int]:
    """The token ids of a /v1/completions ``prompt``: a string or a token list, or a list of one of those."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = served.tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        vocab = len(served.tokenizer)
        _check_range(all(0 <= t < vocab for t in ids), "prompt", f"has token ids outside [0, {vocab})")
    else:
        raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                       "prompt", "invalid_type")
    _check_range(len(ids) > 0, "prompt", "is empty")
    return ids


def chat_prompt(body: dict, served: ServedModel) -> list[int]:
    """The token ids of /v1/chat/completions ``messages`` rendered by the tokenizer's chat template."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages", "messages", "invalid_type")
    plain = [_message(m, i) for i, m in enumerate(messages)]
    if not served.tokenizer.chat_template:
        raise ApiError(400, f"'{served.name}' has no chat template; use /v1/completions", "messages",
                       "no_chat_template")
    text = served.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    return served.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes BOS itself


def _message(message, index: int) -> dict:
    """One message as {"role", "content"} with text content (content parts of type text are joined)."""
    param = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(400, f"{param} must be an object with a string 'role'", param, "invalid_type")
    content = message.get("content") or ""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"{param}.content parts must be of type 'text'", f"{param}.content", "invalid_type")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{param}.content must be a string or a list of text parts", f"{param}.content",
                       "invalid_type")
    return {"role": message["role"], "content": content}


class ResponseShape:
    """Builds one request's response JSON: the whole answer, or its stream chunks (``chat`` or not), with
    log probabilities when ``logprobs`` (a LogprobsShape) is given."""

    def __init__(self, chat: bool, model: str, logprobs: LogprobsShape | None = None) -> None:
        self.chat = chat
        self.model = model
        self.logprobs = logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.sent_role = False

    def _envelope(self, obj: str, choice: dict, update: Update, tokens: list[TokenLogprobs] = ()) -> dict:
        logprobs = self.logprobs.json(list(tokens)) if self.logprobs is not None else None
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice, "logprobs": logprobs, "finish_reason": update.finish_reason}],
                "usage": usage(update)}

    def full(self, text: str, last: Update, tokens: list[TokenLogprobs] = ()) -> dict:
        """The whole answer; ``tokens``: every generated token's log probabilities, when asked for."""
        if self.chat:
            return self._envelope("chat.completion", {"message": {"role": "assistant", "content": text}}, last,
                                  tokens)
        return self._envelope("text_completion", {"text": text}, last, tokens)

    def usage_chunk(self, last: Update) -> dict:
        """The extra last chunk ``stream_options.include_usage`` asks for: no choices, the request's usage."""
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": usage(last)}

    def chunk(self, update: Update) -> dict:
        """A stream chunk (one generated token); usage rides on the last one (the one with a finish_reason)."""
        tokens = [update.logprobs] if update.logprobs is not None else []
        if self.chat:
            delta = {"content": update.text} | ({} if self.sent_role else {"role": "assistant"})
            self.sent_role = True
            body = self._envelope("chat.completion.chunk", {"delta": delta}, update, tokens)
        else:
            body = self._envelope("text_completion", {"text": update.text}, update, tokens)
        if update.finish_reason is None:
            body["usage"] = None
        return body


def usage(update: Update) -> dict:
    return {"prompt_tokens": update.prompt_tokens, "completion_tokens": update.completion_tokens,
            "total_tokens": update.prompt_tokens + update.completion_tokens}
