"""Concurrent sessions share one LM-head pass: the final norm + vocab projection of every session's
hidden states asked for at about the same time run as one matrix product, then split per session.

Why: the LM head is the client's biggest cost (SmolLM2: a 576 x 49152 float32 matrix, 113 MB read per
call). Run per session, N users read it N times per token, and their next steps reach the nodes one
session at a time, so the nodes' batching has little to batch. Coalesced, the matrix is read once for
all of them and their next steps leave together.

How: `logits(hidden)` queues the request. One pass at a time runs per event loop, over everything
queued when it starts; requests made while it runs (other sessions' node replies arriving meanwhile)
join the next pass, so the batch follows the load without a timer. The pass runs on the event loop's own
thread, which holds the client's one pool of CPU threads (models/torch_threads.py). It used to run on the
process's compute thread (`off_loop=True`, kept as an option) so that the loop could serve the other
sessions' gRPC I/O during it, but the hop there and back cost a lone session ~0.3 ms a token (a
4-block tiny model, `scripts/bench_overhead.py --model tiny`: 134-143 tokens/s against 146), 1-2 % of
SmolLM2's loopback speed (7 paired runs of that bench on SmolLM2: +1.6 % on average), and bought
nothing measurable at 8 or 16 sessions: with the passes waiting for every member (below), the replies the
loop would serve meanwhile are the ones the pass is waiting for anyway (scripts/bench_batching.py, N=16:
186-193 tokens/s off the loop, 192-197 on it).

Sessions in their decode loop join as `decoding()` members, and a pass waits (a bounded while) until every
member has its request queued. Why: left alone, concurrent sessions split into groups that take turns -
one at the head while the other is at the nodes - and each node sees a batch of a group, not of everyone
(SmolLM2, 16 sessions: node batches of 3.5 instead of 9). With the wait, their steps leave the client
together, so the nodes batch them all. The wait ends early when everyone is there, and at the latest
after the members' usual time between two requests (one token's round trip), capped by `max_wait`: a
member stuck in failover or a slow node slows the others by at most that per token.

`greedy` also hands back each row's argmax, taken once over the whole pass on the compute thread: sessions
choosing their tokens one by one on the event loop took 0.1 ms each, between the head pass and the next steps
leaving (1.6 ms a token at 16 sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import torch_threads

MAX_WAIT_S = 0.25  # the longest a pass waits for members' requests


@dataclass(eq=False)
class Decoder:
    """A session in its decode loop (`HeadBatcher.decoding`): passes wait for its next request."""

    last: float | None = None  # time.monotonic() of its latest request
    cycle: float | None = None  # the time between its latest two requests


@dataclass
class _Request:
    hidden: torch.Tensor  # (B, T, H)
    done: asyncio.Future
    decoder: Decoder | None = None
    argmax: bool = False  # the result is (logits, their argmax over the vocab)
    queued: float = field(default_factory=time.monotonic)


class HeadBatcher:
    """Wraps a client head (`models.block.Head`, or one placed on a device): `embed` as is, `logits`
    merged across the concurrent callers on one event loop."""

    def __init__(self, head: Any, off_loop: bool = False, max_wait: float = MAX_WAIT_S):
        self.head, self.off_loop, self.max_wait = head, off_loop, max_wait
        self.passes = 0  # LM-head passes run (merged ones count once)
        self._queues: dict[asyncio.AbstractEventLoop, list[_Request]] = {}  # requests waiting for a pass
        self._members: dict[asyncio.AbstractEventLoop, set[Decoder]] = {}  # sessions in their decode loop
        self._arrived: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}  # a request came or a member left
        self._runners: set[asyncio.Task] = set()  # strong references: a running task must not be collected

    @classmethod
    def of(cls, head: Any) -> HeadBatcher:
        """`head` if it already is a batcher (the model's shared one), else a batcher of its own."""
        return head if isinstance(head, HeadBatcher) else cls(head)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, hidden): a table lookup, cheap per session; nothing to gain by merging."""
        return self.head.embed(ids)

    @contextlib.contextmanager
    def decoding(self) -> Iterator[Decoder]:
        """Membership for one session's decode loop; pass the member to `logits` so passes wait for it."""
        loop = asyncio.get_running_loop()
        member = Decoder()
        self._members.setdefault(loop, set()).add(member)
        try:
            yield member
        finally:
            members = self._members.get(loop, set())
            members.discard(member)
            if not members:
                self._members.pop(loop, None)
            self._signal(loop)

    async def logits(self, hidden: torch.Tensor, member: Decoder | None = None) -> torch.Tensor:
        """(B, T, hidden) -> (B, T, vocab) float32, the same as `head.logits(hidden)`, computed in one pass
        with the other requests pending on this event loop (and, for a `member`, the other members')."""
        return await self._request(hidden, member, argmax=False)

    async def greedy(self, hidden: torch.Tensor, member: Decoder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`logits(hidden)` and their argmax (B, T): greedy tokens, chosen on the compute thread with the pass."""
        return await self._request(hidden, member, argmax=True)

    async def _request(self, hidden: torch.Tensor, member: Decoder | None, argmax: bool) -> Any:
        loop = asyncio.get_running_loop()
        request = _Request(hidden, loop.create_future(), member, argmax)
        if member is not None:
            if member.last is not None:
                member.cycle = request.queued - member.last
            member.last = request.queued
        queue = self._queues.get(loop)
        if queue is None:  # no pass running or queued on this loop: start the runner (it starts next turn)
            queue = self._queues[loop] = []
            runner = loop.create_task(self._run(loop, queue))
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        queue.append(request)
        self._signal(loop)
        return await request.done

    def _signal(self, loop: asyncio.AbstractEventLoop) -> None:
        event = self._arrived.get(loop)
        if event is not None:
            event.set()

    async def _gather(self, loop: asyncio.AbstractEventLoop, queue: list[_Request]) -> None:
        """Waits until every member's request is queued, or their usual time between requests has passed
        since the oldest queued one (at most `max_wait`)."""
        event = self._arrived.setdefault(loop, asyncio.Event())
        while True:
            members = self._members.get(loop, set())
            if not queue or members <= {r.decoder for r in queue}:
                return
            cycles = [m.cycle for m in members if m.cycle is not None]
            wait = min(self.max_wait, statistics.median(cycles)) if cycles else self.max_wait
            left = queue[0].queued + wait - time.monotonic()
            if left <= 0:
                return
            event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)

    async def _run(self, loop: asyncio.AbstractEventLoop, queue: list[_Request]) -> None:
        batch: list[_Request] = []
        try:
            while queue:
                if self._members.get(loop):
                    await self._gather(loop, queue)
                batch = [r for r in queue if not r.done.cancelled()]
                queue.clear()
                if not batch:
                    continue
                hiddens, argmax = [r.hidden for r in batch], [r.argmax for r in batch]
                results = (
                    await torch_threads.on_compute_thread(self._compute, hiddens, argmax)
                    if self.off_loop
                    else self._compute(hiddens, argmax)
                )
                for request, result in zip(batch, results, strict=True):
                    if request.done.done():
                        continue
                    if isinstance(result, BaseException):
                        request.done.set_exception(result)
                    else:
                        request.done.set_result(result)
                batch = []
        finally:  # the loop is closing (runner cancelled): nobody waits forever
            del self._queues[loop]
            self._arrived.pop(loop, None)
            for request in batch + queue:
                request.done.cancel()

    def _compute(self, hiddens: list[torch.Tensor], argmax: list[bool]) -> list[Any]:
        """Every request's logits (and argmax, where asked) from one pass; if the merged pass fails, each
        alone, so that one bad request fails by itself."""
        self.passes += 1
        if len(hiddens) == 1:
            return [self._alone(hiddens[0], argmax[0])]
        try:
            rows = [h.reshape(-1, h.shape[-1]) for h in hiddens]  # (B_i * T_i, H) each
            logits = self.head.logits(torch.cat(rows))  # (sum B_i * T_i, V): the matrix read once
            sizes = [r.shape[0] for r in rows]
            chosen = logits.argmax(-1).split(sizes) if any(argmax) else [None] * len(rows)  # (B_i * T_i,) each
            return [
                _result(part.view(*h.shape[:-1], -1), ids if wants else None)
                for part, ids, h, wants in zip(logits.split(sizes), chosen, hiddens, argmax, strict=True)
            ]  # (B_i, T_i, V), maybe with (B_i, T_i)
        except Exception:
            self.passes += len(hiddens) - 1
            return [self._alone(h, wants) for h, wants in zip(hiddens, argmax, strict=True)]

    def _alone(self, hidden: torch.Tensor, argmax: bool) -> Any:
        try:
            logits = self.head.logits(hidden)  # (B, T, V)
            return _result(logits, logits.argmax(-1) if argmax else None)
        except Exception as error:  # handed to the caller's future
            return error


def _result(logits: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What a request gets: its logits (B, T, V), with their argmax (B, T) where it asked for them."""
    return logits if ids is None else (logits, ids.view(logits.shape[:-1]))
