"""Generation for a request: one job per prompt, each the SDK's text pieces tagged with the choice they fill.

A request with several prompts runs its jobs concurrently (each its own session) and `merge`s their
pieces as they come; `first_and_rest` waits for the first piece before any HTTP status is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from ..client.model import AsyncDistributedModel
from ..client.sampling import SamplingParams
from .schema import Usage


@dataclass
class Job:
    index: int  # the choice it fills
    ids: torch.Tensor  # prompt (1, T)
    params: SamplingParams
    echo: str = ""  # text to put before the completion
    completion_tokens: int = 0  # counted as the job runs
    adapter: str | None = None  # LoRA adapter (model "BASE:ADAPTER"); None: the server's default

    @property
    def prompt_tokens(self) -> int:
        return self.ids.shape[1]


@dataclass(frozen=True)
class Piece:
    index: int  # the job's
    text: str
    finish_reason: str | None = None  # set on a job's last piece: "stop" (EOS or a stop string) or "length"


async def run_job(model: AsyncDistributedModel, job: Job) -> AsyncIterator[Piece]:
    """The job's text as it is generated (AsyncDistributedModel.generate_text), echo first."""
    if job.echo:
        yield Piece(job.index, job.echo)
    options = model.generation.override(adapter=job.adapter)  # None: the server's --adapter
    pieces = model.generate_text(job.ids, job.params, options=options)
    async with contextlib.aclosing(pieces):  # closing it closes the session
        async for piece in pieces:
            job.completion_tokens = piece.tokens
            yield Piece(job.index, piece.text, piece.finish_reason)


def usage_of(jobs: list[Job]) -> Usage:
    prompt, completion = sum(j.prompt_tokens for j in jobs), sum(j.completion_tokens for j in jobs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def merge(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Items of all streams as they come; the first error stops (and closes) every stream."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[Piece | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[Piece]) -> None:
        try:
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    queue.put_nowait(item)
            queue.put_nowait(None)
        except Exception as e:
            queue.put_nowait(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def first_and_rest(events: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    """Waits for the first piece now, so that a swarm failure is an HTTP 503, not a stream that breaks."""
    first = await anext(events)

    async def chained() -> AsyncIterator[Piece]:
        async with contextlib.aclosing(events):
            yield first
            async for piece in events:
                yield piece

    return chained()
