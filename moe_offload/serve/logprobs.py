"""Log probabilities of generated tokens: what the engine computes per token, and the two OpenAI shapes
(``/v1/completions``' ``logprobs`` object and chat's ``logprobs.content`` list) the server sends.

The log probabilities are ``log_softmax`` (in float32) of the logits the engine chose the token from:
the model's logits after the request's ``logit_bias`` and frequency/presence penalties, before
temperature, top-k and top-p (which shape the sampling, not the model's distribution). With neither
bias nor penalties they are the model's own log probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' integer ``logprobs``
MAX_TOP_LOGPROBS = 20  # and for chat's ``top_logprobs``


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log probability and the ``top`` most likely tokens' (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """``token``'s log probability under ``logits`` [V], with the ``top`` most likely tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [V]
    if top == 0:
        return TokenLogprobs(token, float(logprobs[token]))
    values, ids = logprobs.topk(top)  # [top], [top]
    return TokenLogprobs(token, float(logprobs[token]), tuple(zip(ids.tolist(), values.tolist())))


class LogprobsShape:
    """Turns a request's TokenLogprobs into OpenAI's JSON, with token text from ``tokenizer``."""

    def __init__(self, tokenizer, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.offset = 0  # characters of completion text before the next token (text_offset)

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def json(self, tokens: list[TokenLogprobs]) -> dict:
        """The ``logprobs`` object of a choice or a stream chunk covering ``tokens``."""
        if self.chat:
            return {"content": [self._chat_entry(t) for t in tokens], "refusal": None}
        texts = [self.text(t.token) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{self.text(i): lp for i, lp in t.top} | {text: t.logprob}
                                 for t, text in zip(tokens, texts)],
                "text_offset": offsets}

    def _chat_entry(self, t: TokenLogprobs) -> dict:
        return self._entry(t.token, t.logprob) | {"top_logprobs": [self._entry(i, lp) for i, lp in t.top]}

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
