"""Turning generated token ids into text as it comes: incremental decoding, stop strings, finish reasons.

`text_pieces` is the one generation-to-text iterator: the SDK's `stream`, chat sessions, the chat CLI and
the OpenAI API all read it. `TextStream` does the decoding for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .sampling import SamplingParams

INCOMPLETE = "\ufffd"  # what decoding makes of the bytes of a character whose other bytes are still to come


@dataclass(frozen=True)
class TextPiece:
    text: str
    finish_reason: str | None = None  # on the last piece only: "stop" (EOS or a stop string) or "length"
    tokens: int = 0  # tokens generated so far: the last piece's is the completion's token count


async def text_pieces(
    tokenizer, new_ids: AsyncGenerator[torch.Tensor, None], params: SamplingParams, eos_ids: Collection[int]
) -> AsyncGenerator[TextPiece, None]:
    """The text of one sequence's new token ids (each a tensor (1,)) as it is generated.

    Yields pieces with text, then always one last piece (its text may be empty) with the finish reason
    and the token count. A stop string ends generation and is left out. `new_ids` is closed (and with
    it the session it runs on) before the last piece, or when this iterator is closed.
    """
    stream, count, last, piece = TextStream(tokenizer, params.stop), 0, None, ""
    async with contextlib.aclosing(new_ids):
        if params.max_new_tokens > 0:  # 0: nothing to generate, so no session to open
            async for new in new_ids:
                last, count = int(new[0]), count + 1
                piece = stream.push(last)
                if stream.stopped:
                    break  # `piece` is the text before the stop string: the last piece's
                if piece:
                    yield TextPiece(piece, tokens=count)
    tail = piece if stream.stopped else stream.flush()
    ended = stream.stopped or (last in eos_ids and not params.ignore_eos)
    yield TextPiece(tail, "stop" if ended else "length", count)


class TextStream:
    """Token ids in, new complete text out, decoding only a short window of the latest ids.

    The window is the usual incremental detokenization (TGI, vLLM): `prefix_offset..read_offset` are the
    ids of the text returned last; decoding `prefix_offset..` and cutting off the window's own text
    leaves the new text, with the tokenizer's whitespace rules applied as in a decode of everything.
    Text ending in U+FFFD is a character whose bytes are still incomplete: it waits for the next id
    (and the window stays put, so that the window always starts on a character boundary). Text that
    could be the start of a stop string is held back until it is clearly not one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window's first id
        self.read_offset = 0  # ids before it are decoded into text already returned or held
        self.held = ""  # decoded text not returned yet: it may be the start of a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" if none yet); after a stop string, always ""."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        return self._cut_at_stops(self._new_text(final=False), final=False)

    def flush(self) -> str:
        """The rest, once generation is over: incomplete characters as U+FFFD, held-back text."""
        if self.stopped:
            return ""
        return self._cut_at_stops(self._new_text(final=True), final=True)

    def _new_text(self, final: bool) -> str:
        window = self._decode(self.ids[self.prefix_offset :])
        known = self._decode(self.ids[self.prefix_offset : self.read_offset])
        if len(window) <= len(known) or (window.endswith(INCOMPLETE) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return window[len(known) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _cut_at_stops(self, new: str, final: bool) -> str:
        """What of held + new text can be returned: up to the first stop string, or all but a stop's start."""
        text = self.held + new
        found = [at for s in self.stop if (at := text.find(s)) != -1]
        if found:
            self.stopped, self.held = True, ""
            return text[: min(found)]
        keep = 0 if final else max((_partial_suffix(text, s) for s in self.stop), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


async def text_only(pieces: AsyncGenerator[TextPiece, None]) -> AsyncGenerator[str, None]:
    """The pieces' text, empty ones left out (the stream() contract), closing `pieces` when closed."""
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            if piece.text:
                yield piece.text
