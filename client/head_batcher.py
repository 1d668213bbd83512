"""Concurrent sessions share one LM-head pass: the final norm + vocab projection of every session's
hidden states asked for at about the same time run as one matrix product, then split per session.

Why: the LM head is the client's biggest cost (SmolLM2: a 576 x 49152 float32 matrix, 113 MB read per
call). Run per session, N users read it N times per token, and their next steps reach the nodes one
session at a time, so the nodes' batching has little to batch. Coalesced, the matrix is read once for
all of them and their next steps leave together.

How: `logits(hidden)` queues the request. One pass at a time runs per event loop, over everything
queued when it starts; requests made while it runs (other sessions' node replies arriving meanwhile)
join the next pass, so the batch follows the load without a timer. The pass runs in a worker thread
(`off_loop`) so the event loop keeps serving the other sessions' gRPC I/O during it; a lone session
pays one thread hop (~0.1 ms against a ~10 ms head pass).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Request:
    hidden: torch.Tensor  # (B, T, H)
    done: asyncio.Future


class HeadBatcher:
    """Wraps a client head (`models.block.Head`, or one placed on a device): `embed` as is, `logits`
    merged across the concurrent callers on one event loop."""

    def __init__(self, head: Any, off_loop: bool = True):
        self.head, self.off_loop = head, off_loop
        self.passes = 0  # LM-head passes run (merged ones count once)
        self._queues: dict[asyncio.AbstractEventLoop, list[_Request]] = {}  # requests waiting for a pass
        self._runners: set[asyncio.Task] = set()  # strong references: a running task must not be collected

    @classmethod
    def of(cls, head: Any) -> HeadBatcher:
        """`head` if it already is a batcher (the model's shared one), else a batcher of its own."""
        return head if isinstance(head, HeadBatcher) else cls(head)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, hidden): a table lookup, cheap per session; nothing to gain by merging."""
        return self.head.embed(ids)

    async def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) -> (B, T, vocab) float32, the same as `head.logits(hidden)`, computed in one pass
        with the other requests pending on this event loop."""
        loop = asyncio.get_running_loop()
        request = _Request(hidden, loop.create_future())
        queue = self._queues.get(loop)
        if queue is None:  # no pass running or queued on this loop: start the runner (it starts next turn)
            queue = self._queues[loop] = []
            runner = loop.create_task(self._run(loop, queue))
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        queue.append(request)
        return await request.done

    async def _run(self, loop: asyncio.AbstractEventLoop, queue: list[_Request]) -> None:
        batch: list[_Request] = []
        try:
            while queue:
                batch = [r for r in queue if not r.done.cancelled()]
                queue.clear()
                if not batch:
                    continue
                hiddens = [r.hidden for r in batch]
                results = await asyncio.to_thread(self._compute, hiddens) if self.off_loop else self._compute(hiddens)
                for request, result in zip(batch, results):
                    if request.done.done():
                        continue
                    if isinstance(result, BaseException):
                        request.done.set_exception(result)
                    else:
                        request.done.set_result(result)
                batch = []
        finally:  # the loop is closing (runner cancelled): nobody waits forever
            del self._queues[loop]
            for request in batch + queue:
                request.done.cancel()

    def _compute(self, hiddens: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
        """Every request's logits from one pass; if the merged pass fails, each alone, so that one bad
        request fails by itself."""
        self.passes += 1
        if len(hiddens) == 1:
            return [self._alone(hiddens[0])]
        try:
            rows = [h.reshape(-1, h.shape[-1]) for h in hiddens]  # (B_i * T_i, H) each
            logits = self.head.logits(torch.cat(rows))  # (sum B_i * T_i, V): the matrix read once
            sizes = [r.shape[0] for r in rows]
            return [part.view(*h.shape[:-1], -1) for part, h in zip(logits.split(sizes), hiddens)]  # (B_i, T_i, V)
        except Exception:
            self.passes += len(hiddens) - 1
            return [self._alone(h) for h in hiddens]

    def _alone(self, hidden: torch.Tensor) -> torch.Tensor | Exception:
        try:
            return self.head.logits(hidden)  # (B, T, V)
        except Exception as error:  # handed to the caller's future
            return error
