"""Which ready steps run together: continuous batching on a node (vLLM's scheduler, apart from its runner).

Sessions send steps whenever their client is ready. Steps queue here; each time the runner is free it
asks for the next batch and gets every queued step that fits `max_batch_tokens`, cut where needed:

- whole steps first, smallest first, so decode steps (one token each) are never stuck behind a prompt;
- then the rest in arrival order, in chunks of whatever budget is left: a long prefill advances a
  chunk per batch while the others' decode steps keep running beside it (chunked prefill).

With `fair` (the node's fair share, node/fair_share.py), both passes take the client keys in turn: each
key's first step (in the order above), then each key's second, and so on, so a client sending many or
large steps takes no more of a batch than its turn while another key is waiting.

Steps in one batch run the same blocks (a session may use only part of a node's span); the oldest
step's blocks are served first, so no group waits forever. A step's output is handed back once all its
chunks have run. This module only decides: the node's runner (node/span_backend.py) executes a batch.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..models.kv_cache import KVCache

WAIT_CAP = 10  # the longest wait for a batch to fill, in units of batch_wait
Deliver = Callable[[torch.Tensor | BaseException], None]  # gets the step's output (B, T, hidden) or its error


class SchedulerClosed(Exception):
    """A step that was still queued (or half run) when the node shut down."""


@dataclass(eq=False)
class Work:
    """One step waiting to run: a session's new tokens, or a stateless pass with caches of its own."""

    x: torch.Tensor  # (B, T, hidden)
    position: int  # where its first token sits
    start: int  # blocks [start, end) to run
    end: int
    caches: list[KVCache]  # one per block of [start, end)
    deliver: Deliver
    session_id: str | None = None  # None: a stateless pass
    client: bytes = b""  # the key of the client that sent it (its turn in a fair batch)
    done: int = 0  # tokens already run (chunked prefill)
    outputs: list[torch.Tensor] = field(default_factory=list)  # (B, chunk, hidden) each
    seq: int = 0  # arrival order
    dropped: bool = False

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def remaining(self) -> int:
        return self.x.shape[1] - self.done


@dataclass(frozen=True)
class Chunk:
    """The part of a step that runs in one batch: `tokens` tokens from `work.done` on."""

    work: Work
    tokens: int

    @property
    def x(self) -> torch.Tensor:
        return self.work.x[:, self.work.done : self.work.done + self.tokens]  # (B, tokens, hidden)

    @property
    def position(self) -> int:
        return self.work.position + self.work.done


@dataclass(frozen=True)
class Batch:
    start: int
    end: int
    chunks: list[Chunk]

    @property
    def tokens(self) -> int:
        return sum(c.tokens * c.work.rows for c in self.chunks)


class Scheduler:
    """A thread-safe queue of steps; `next_batch` (the runner's thread) blocks until there is work."""

    def __init__(
        self,
        max_batch_tokens: int,
        batch_wait: float,
        active_sessions: Callable[[], int] = lambda: 1,
        fair: bool = False,
    ):
        self.max_batch_tokens, self.batch_wait = max_batch_tokens, batch_wait
        self.fair = fair  # client keys take turns in each batch
        self.active_sessions = active_sessions  # how many steps could arrive at most: no use waiting for more
        self._queue: list[Work] = []  # by arrival
        self._running: list[Work] = []  # the batch the runner holds now
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._last_arrival = -float("inf")  # time.monotonic() of the latest submit
        self._held = 0  # holds open (`hold`): submits queue without waking the runner

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def submit(self, work: Work) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            work.seq = next(self._seq)
            self._queue.append(work)
            self._last_arrival = time.monotonic()
            # the runner is told when its wait starts (first step) or can end (the batch is full): woken for
            # every step of a burst, it took the GIL from the loop thread queueing the rest (16 steps: 1.6 ms
            # from the first queued to the pass, 0.8 ms without)
            if not self._held and (len(self._queue) == 1 or not self._worth_waiting()):
                self._cond.notify()

    def hold(self) -> None:
        """Until the matching `release`, submits only queue: a burst known in advance (a StepBatch's steps)
        wakes the runner once, after its last step. Woken at the first, the runner takes the GIL from the
        thread still queueing the rest (8 steps: 0.2-0.3 ms of the ~1 ms from message to pass)."""
        with self._cond:
            self._held += 1

    def release(self) -> None:
        with self._cond:
            self._held -= 1
            if not self._held and self._queue:
                self._cond.notify()

    def drop(self, session_id: str) -> None:
        """Forgets a closed session's steps; a chunk of it running now is thrown away when it ends."""
        with self._cond:
            for work in self._queue + self._running:
                if work.session_id == session_id:
                    work.dropped = True
            self._queue = [w for w in self._queue if not w.dropped]

    def close(self) -> None:
        """Stops handing out batches; steps still queued get SchedulerClosed."""
        with self._cond:
            self._closed = True
            left, self._queue = self._queue, []
            self._cond.notify_all()
        for work in left:
            work.deliver(SchedulerClosed("the node is shutting down"))

    def next_batch(self) -> Batch | None:
        """The next batch to run; None once closed.

        While fewer steps are queued than sessions are open, it waits for more as long as they keep coming:
        until none has arrived for `batch_wait` (at most WAIT_CAP times that in all). Steps that queued
        while the runner was busy start at once; a burst (a client sending many sessions' steps one after
        another) runs as one batch instead of being cut at its first step."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            cap = time.monotonic() + WAIT_CAP * self.batch_wait
            while not self._closed and self._worth_waiting():  # a burst of steps: until it goes quiet
                left = min(self._last_arrival + self.batch_wait, cap) - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._closed:
                return None
            batch = self._form_batch()
            self._running = [c.work for c in batch.chunks]
            chosen = {id(w) for w in self._running}
            self._queue = [w for w in self._queue if id(w) not in chosen]
            return batch

    def finish(self, batch: Batch, outputs: list[torch.Tensor] | BaseException) -> None:
        """Records a batch's outputs (one per chunk), hands finished steps back and requeues the rest."""
        for i, chunk in enumerate(batch.chunks):
            work = chunk.work
            if isinstance(outputs, BaseException):
                if not work.dropped:
                    work.deliver(outputs)
                continue
            work.outputs.append(outputs[i])
            work.done += chunk.tokens
            if work.remaining == 0:
                if not work.dropped:
                    work.deliver(work.outputs[0] if len(work.outputs) == 1 else torch.cat(work.outputs, dim=1))
                continue
            with self._cond:  # back in its place by arrival, ahead of newer steps
                if not work.dropped and not self._closed:
                    bisect.insort(self._queue, work, key=lambda w: w.seq)
                    continue
            if not work.dropped:
                work.deliver(SchedulerClosed("the node is shutting down"))
        with self._cond:
            self._running = []

    def _worth_waiting(self) -> bool:
        queued = sum(w.rows * w.remaining for w in self._queue)
        return queued < self.max_batch_tokens and len(self._queue) < self.active_sessions()

    def _form_batch(self) -> Batch:
        oldest = self._queue[0]
        group = [w for w in self._queue if (w.start, w.end) == (oldest.start, oldest.end)]
        budget = self.max_batch_tokens
        taken: dict[int, int] = {}  # id(work) -> tokens this batch
        for work in self._turns(group, key=lambda w: (w.rows * w.remaining, w.seq)):  # whole steps, smallest first
            if work.rows * work.remaining <= budget:
                taken[id(work)] = work.remaining
                budget -= work.rows * work.remaining
        for work in self._turns(group, key=lambda w: w.seq):  # then chunks of the rest, oldest first
            if id(work) not in taken and budget >= work.rows:
                taken[id(work)] = min(work.remaining, budget // work.rows)
                budget -= taken[id(work)] * work.rows
        if not taken:  # one step wider than the whole budget (batch_size > max_batch_tokens): a token at a time
            taken[id(oldest)] = 1
        return Batch(oldest.start, oldest.end, [Chunk(w, taken[id(w)]) for w in group if id(w) in taken])

    def _turns(self, works: list[Work], key: Callable[[Work], tuple | int]) -> list[Work]:
        """`works` ordered by `key`; when fair, the client keys in turn (each one's first, then each one's second)."""
        ordered = sorted(works, key=key)
        if not self.fair:
            return ordered
        turn: dict[int, int] = {}
        seen: dict[bytes, int] = {}
        for work in ordered:
            turn[id(work)] = seen.get(work.client, 0)
            seen[work.client] = turn[id(work)] + 1
        return sorted(ordered, key=lambda w: turn[id(w)])  # stable: within a turn, still by `key`
