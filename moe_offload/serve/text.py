"""IncrementalText: a sequence's generated text as it grows, with stop strings held back.

Tokens arrive one at a time; the text is decoded from all of them (a token may end inside a
multi-byte character, shown as U+FFFD until the next one completes it), and only text that can no
longer be part of a stop string is released. The text of a stop string and everything after it is
never sent, as OpenAI servers do.
"""

from __future__ import annotations


class IncrementalText:
    """Decodes ``tokens`` with ``tokenizer`` and releases text that no stop string can still claim."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars a partial stop may span
        self.tokens: list[int] = []
        self.released = 0  # characters of the text already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Add one token; the newly released text (empty while held back). Sets ``stopped`` on a stop."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._release(text, cut)
        end = len(text) - self.hold
        while end > self.released and text[end - 1] == "\ufffd":  # an unfinished character
            end -= 1
        return self._release(text, end)

    def finish(self) -> str:
        """The text still held back, at the end of generation (nothing after a stop string)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._release(text, len(text))

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts in the unreleased text, if one is there."""
        found = [i for i in (text.find(s, self.released) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _release(self, text: str, end: int) -> str:
        if end <= self.released:
            return ""
        piece, self.released = text[self.released:end], end
        return piece
