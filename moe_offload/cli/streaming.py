"""Timing of generate(): prefill and decode tokens/s from a TextStreamer."""

from __future__ import annotations

import time
from dataclasses import dataclass

from transformers import TextStreamer


@dataclass(frozen=True)
class GenerationTiming:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float   # prompt forward + first token
    decode_s: float    # every later token

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


class TimedStreamer(TextStreamer):
    """A TextStreamer that also notes when the prompt arrives and each token leaves.

    ``quiet=True`` keeps the timing and drops the printing.
    """

    def __init__(self, tokenizer, quiet: bool = False, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=True, **decode_kwargs)
        self.quiet = quiet
        self.prompt_tokens = 0
        self.new_tokens = 0
        self._t0 = self._t_first = self._t_last = 0.0

    def put(self, value) -> None:
        now = time.perf_counter()
        if self.next_tokens_are_prompt:
            self._t0 = now
            self.prompt_tokens = value.shape[-1]
        else:
            if self.new_tokens == 0:
                self._t_first = now
            self._t_last = now
            self.new_tokens += value.numel()
        if not self.quiet:
            super().put(value)
        elif self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False

    def end(self) -> None:
        if not self.quiet:
            super().end()

    def timing(self) -> GenerationTiming:
        return GenerationTiming(self.prompt_tokens, self.new_tokens, self._t_first - self._t0,
                                self._t_last - self._t_first)
