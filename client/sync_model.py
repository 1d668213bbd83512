"""The synchronous SDK: the same calls as `AsyncDistributedModel`, run on a private event loop thread
(hivemind's DHT does the same), for code that does not use asyncio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import torch

from .chat_session import AsyncChatSession
from .loop_thread import LoopThread
from .model import DEFAULT_MAX_LENGTH, AsyncDistributedModel, Prompt

T = TypeVar("T")


class DistributedModel:
    """Synchronous front end with the same calls as AsyncDistributedModel."""

    def __init__(self, core: AsyncDistributedModel, loop: LoopThread):
        self._core, self._loop = core, loop

    @property
    def async_model(self) -> AsyncDistributedModel:
        """The asyncio core, for calls that need it (open a session, step it); run them with `run`."""
        return self._core

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine of `async_model` on this model's event loop thread and returns its result."""
        return self._loop.run(coro)

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """Drives an async iterator of `async_model` (e.g. `generate_ids`) from synchronous code."""
        return self._loop.iterate(agen)

    @classmethod
    def from_pretrained(
        cls, model: str, peers: Sequence[str] = (), initial_peers: Sequence[str] = (), **options: Any
    ) -> DistributedModel:
        """See AsyncDistributedModel.from_pretrained: the same options (config=, generation=, or their fields by
        keyword). The model is made on this object's loop thread (grpc.aio channels bind to the loop they are made
        on)."""
        loop = LoopThread()
        try:
            return cls(loop.run(AsyncDistributedModel.from_pretrained(model, peers, initial_peers, **options)), loop)
        except BaseException:
            loop.stop()
            raise

    @property
    def tokenizer(self):
        return self._core.tokenizer

    def generate(self, prompt: Prompt | list[str], chat: bool = False, **sampling) -> torch.Tensor | list[torch.Tensor]:
        return self._loop.run(self._core.generate(prompt, chat, **sampling))

    def stream(self, prompt: Prompt, chat: bool = False, **sampling) -> Iterator[str]:
        return self._loop.iterate(self._core.stream(prompt, chat, **sampling))

    def logits(self, input_ids: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        return self._loop.run(self._core.logits(input_ids, adapter))

    def session(
        self,
        max_length: int = DEFAULT_MAX_LENGTH,
        draft: str | None = None,
        draft_tokens: int | None = None,
        adapter: str | None = None,
    ) -> ChatSession:
        return ChatSession(self._core.session(max_length, draft, draft_tokens, adapter), self._loop)

    def close(self) -> None:
        try:
            self._loop.run(self._core.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> DistributedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ChatSession:
    """Synchronous twin of AsyncChatSession."""

    def __init__(self, core: AsyncChatSession, loop: LoopThread):
        self._core, self._loop = core, loop

    @property
    def cached_tokens(self) -> int:
        """Tokens of the conversation whose keys and values the nodes hold."""
        return len(self._core.cached)

    def __enter__(self) -> ChatSession:
        self._loop.run(self._core.__aenter__())
        return self

    def __exit__(self, *exc) -> None:
        self._loop.run(self._core.__aexit__(*exc))

    def generate(self, prompt: Prompt, chat: bool = False, **sampling) -> torch.Tensor:
        return self._loop.run(self._core.generate(prompt, chat, **sampling))

    def stream(self, prompt: Prompt, chat: bool = False, **sampling) -> Iterator[str]:
        return self._loop.iterate(self._core.stream(prompt, chat, **sampling))
