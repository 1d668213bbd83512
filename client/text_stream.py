"""Turning a stream of token ids into a stream of text pieces, with stop strings."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Decodes the whole generated sequence each time and emits only the new, complete text.

    Decoding the whole sequence (not token by token) keeps multi-token characters and tokenizer
    whitespace rules right; a piece ending in U+FFFD is an incomplete character and is held back.
    Text that could be the start of a stop string is held back until it is clearly not one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.stopped = True
                return self._emit(text, at)
        held = max((_partial_suffix(text, s) for s in self.stop), default=0)
        return self._emit(text, len(text) - held)

    def flush(self) -> str:
        """The held-back text, once generation is over and no stop string can complete."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True), None)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
