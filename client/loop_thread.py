"""A private asyncio loop on a daemon thread: the synchronous SDK runs the async core through it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from ..models import torch_threads

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="torchnode-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        torch_threads.enter()  # the client's compute thread: the LM head's passes run here (client/head_batcher.py)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """Drives an async iterator from synchronous code; closing the iterator closes the generator."""
        try:
            while True:
                try:
                    yield self.run(_next(agen))
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self.run(aclose())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


async def _next(agen: AsyncIterator[T]) -> T:
    """The next item as a coroutine (what run_coroutine_threadsafe takes; __anext__ gives an awaitable)."""
    return await anext(agen)
