"""Generation for a request: one job per prompt, each the SDK's text pieces tagged with the choice they fill.

A request with several prompts runs its jobs concurrently (each its own session) and `merge`s their
pieces as they come; `first_and_rest` waits for the first piece before any HTTP status is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from ..client.model import AsyncDistributedModel
from ..client.sampling import SamplingParams
from ..client.session import Hop
from ..client.text_stream import text_pieces
from ..protocol.wire.identity import peer_id_of
from .schema import AnswerInfo, RouteHop, Usage


@dataclass
class Job:
    index: int  # the choice it fills
    ids: torch.Tensor  # prompt (1, T)
    params: SamplingParams
    echo: str = ""  # text to put before the completion
    completion_tokens: int = 0  # counted as the job runs
    adapter: str | None = None  # LoRA adapter (model "BASE:ADAPTER"); None: the server's default
    first_route: list[RouteHop] = field(default_factory=list)  # the chain the session opened on
    route: list[RouteHop] = field(default_factory=list)  # the chain now (a failed node's blocks re-routed)
    verified: bool = False  # the session checks every hop (--verify)
    started: float = 0.0  # time.perf_counter() when the job started
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.ids.shape[1]

    def info(self) -> AnswerInfo:
        """How the swarm served the job: its route (and the nodes replaced on the way), its timing."""
        first, last, n = self.first_token_at, self.last_token_at, self.completion_tokens
        speed = (n - 1) / (last - first) if first is not None and last is not None and n > 1 and last > first else None
        now = {(h.address, h.start, h.end) for h in self.route}
        return AnswerInfo(
            route=self.route,
            replaced=[h for h in self.first_route if (h.address, h.start, h.end) not in now],
            verified=self.verified,
            time_to_first_token_s=None if first is None else round(first - self.started, 4),
            tokens_per_second=None if speed is None else round(speed, 2),
            completion_tokens=n,
        )


@dataclass(frozen=True)
class Piece:
    index: int  # the job's
    text: str
    finish_reason: str | None = None  # set on a job's last piece: "stop" (EOS or a stop string) or "length"


async def run_job(model: AsyncDistributedModel, job: Job) -> AsyncIterator[Piece]:
    """The job's text as it is generated, echo first. The job opens its own session, so that it can tell the
    route it took (Job.info). When the caller goes away (an HTTP client that disconnects: the chat page's stop
    button), the node streams are cancelled at once and every node frees the session."""
    job.started = time.perf_counter()
    if job.echo:
        yield Piece(job.index, job.echo)
    options = model.generation.override(adapter=job.adapter)  # None: the server's --adapter
    session = None
    if job.params.max_new_tokens > 0:  # 0: nothing to generate, so no session to open
        session = await model.open_session(job.prompt_tokens + job.params.max_new_tokens, 1, options)
        job.first_route = job.route = route_of(model, session.hops)
        job.verified = session.verifier is not None
    try:
        new_ids = model.generate_ids(job.ids, job.params, session=session, options=options)
        async with contextlib.aclosing(text_pieces(model.tokenizer, new_ids, job.params, model.eos_ids)) as pieces:
            async for piece in pieces:
                if piece.tokens and piece.tokens != job.completion_tokens:
                    job.last_token_at = time.perf_counter()
                    job.first_token_at = job.first_token_at or job.last_token_at
                job.completion_tokens = piece.tokens
                if session is not None:
                    job.route = route_of(model, session.hops)
                yield Piece(job.index, piece.text, piece.finish_reason)
    except BaseException:  # cancelled or closed early (the client left), or failed: drop the node streams now
        if session is not None:
            session.abort()
        raise
    finally:
        if session is not None:
            await session.close()


ROUTE_HEADER = "X-Torchnode-Route"


def route_header(route: list[RouteHop]) -> str:
    """A route as one header line: `ADDRESS START:END tls|plaintext[ relayed], ...` in block order."""
    return ", ".join(
        f"{h.address} {h.start}:{h.end} {'tls' if h.tls else 'plaintext' if h.tls is False else 'link-unknown'}"
        + (" relayed" if h.relayed else "")
        for h in route
    )


def route_of(model: AsyncDistributedModel, hops: list[Hop]) -> list[RouteHop]:
    relayed = model.source.relayed
    return [
        RouteHop(
            address=h.node.address,
            peer_id=peer_id_of(key) if (key := getattr(h.node, "expected_key", None)) else None,
            start=h.start,
            end=h.end,
            tls=h.node.encrypted,
            relayed=h.node.address in relayed,
        )
        for h in hops
    ]


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
