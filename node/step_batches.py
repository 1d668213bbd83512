"""Many sessions' steps on one stream (the StepBatches RPC): one signed message per round, not one per session.

A client stepping N sessions through this node together (a batch of prompts, an API server's users) would
otherwise send N Step messages and read N replies per token, each signed, checked and handled by Python
gRPC at both ends: at N=16 that handling, not the pass, took most of a step (scripts/bench_batching.py).
A StepBatch carries every session's step of a round. Each step runs as it would on an Inference stream
(NodeServicer.run_step), so the scheduler batches them as before; replies go back as steps finish, every
step finished by the time the event loop gets round to it in one StepBatchResult.

A session belongs to the stream that opened it. It is freed when the client names it in `close`, when one
of its steps fails (the error goes back in a reply; the other sessions carry on), when it has been idle past
--session-timeout, or when the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from ..protocol.wire import tensor_codec
from ..protocol.wire import torchnode_pb2 as pb
from .errors import IdleTimeout, NotFound, RequestError, ResourceExhausted
from .span_backend import Session, SpanBackend

log = logging.getLogger(__name__)


class StepRunner(Protocol):
    """What a stream asks of the servicer: open a session from its step 0, run one step of it."""

    def open_session(self, backend: SpanBackend, step: pb.Step, client: bytes) -> Session: ...

    async def run_step(self, backend: SpanBackend, session: Session, step: pb.Step, client: bytes) -> pb.StepResult: ...


@dataclass(eq=False)
class _Open:
    session: Session
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # its steps run one at a time, in arrival order
    running: set[asyncio.Task] = field(default_factory=set)


class StepBatchStream:
    """One StepBatches stream: the sessions it opened, their steps in flight, and the replies to send."""

    def __init__(self, runner: StepRunner, backend: SpanBackend):
        self.runner, self.backend = runner, backend
        self.sessions: dict[str, _Open] = {}
        self.tasks: set[asyncio.Task] = set()
        self.results: list[pb.StepResult] = []
        self.errors: list[pb.StepError] = []
        self.replies: asyncio.Queue[pb.StepBatchResult | BaseException | None] = asyncio.Queue()
        self.last_batch = time.monotonic()
        self.unsent = 0  # answers (results and errors) queued in `replies`, not yet written to the client
        self._flush_due = False

    async def serve(self, requests: AsyncIterator[pb.StepBatch]) -> AsyncIterator[pb.StepBatchResult]:
        """The replies, until the client is done writing and every step it sent has been answered."""
        loop = asyncio.get_running_loop()
        reader, sweeper = loop.create_task(self._read(requests)), loop.create_task(self._sweep())
        try:
            while (reply := await self.replies.get()) is not None:
                if isinstance(reply, BaseException):
                    raise reply
                yield reply  # waits while the client does not read (gRPC's flow control)
                self.unsent -= len(reply.results) + len(reply.errors)
        finally:
            reader.cancel()
            sweeper.cancel()
            for task in list(self.tasks):
                task.cancel()
            for opened in self.sessions.values():
                self.backend.close_session(opened.session)
            self.sessions.clear()

    async def _read(self, requests: AsyncIterator[pb.StepBatch]) -> None:
        try:
            async for batch in requests:
                self.last_batch = time.monotonic()
                self._take(batch)
            while self.tasks:  # done writing: answer what was sent
                await asyncio.wait(set(self.tasks))
            self._flush()
            self.replies.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the interceptor's abort (a bad signature), or a broken stream
            self.replies.put_nowait(e)

    async def _sweep(self) -> None:
        """Frees sessions idle past --session-timeout; ends a stream with nothing open and no batch for as long."""
        idle = self.backend.limits.session_idle_timeout
        while True:
            await asyncio.sleep(max(idle / 4, 0.05))
            now = time.monotonic()
            for sid, opened in list(self.sessions.items()):
                if not opened.running and not opened.session.busy and now - opened.session.last_used > idle:
                    self._close(sid)
            if not self.sessions and not self.tasks and now - self.last_batch > idle:
                self.replies.put_nowait(IdleTimeout(f"stream idle for {idle:.0f}s (--session-timeout); closed"))
                return

    def _take(self, batch: pb.StepBatch) -> None:
        """Starts the batch's steps. A session has one step in flight at a time, so a client never has more
        than --max-sessions in flight on a stream, and as many answers on their way back; more (a flood of
        tiny steps in one message, or steps sent while the answers go unread) ends the stream."""
        limit, in_flight = 2 * self.backend.limits.max_sessions, len(self.tasks) + self.unsent + len(batch.steps)
        if in_flight > limit:
            raise ResourceExhausted(
                f"{in_flight} steps on one StepBatches stream, in flight or answered but not yet read: at most "
                f"{limit}, twice --max-sessions (a step per session, and its answer on the way)"
            )
        client = batch.auth.public_key  # checked by the auth interceptor: the key of every step's fair share
        for session_id in batch.close:
            self._close(session_id, cancel=True)
        loop = asyncio.get_running_loop()
        scheduler = self.backend.scheduler
        scheduler.hold()  # the steps' tasks queue them on their first turn: the runner is woken after the last
        try:
            for step in batch.steps:
                try:
                    opened = self._session_of(step, client)
                except RequestError as e:
                    self._failed(step, e)
                    continue
                task = loop.create_task(self._run(opened, step, client))
                self.tasks.add(task)
                opened.running.add(task)
                task.add_done_callback(self.tasks.discard)
                task.add_done_callback(opened.running.discard)
        finally:
            loop.call_soon(scheduler.release)  # after those first turns (the loop runs callbacks in order)

    def _session_of(self, step: pb.Step, client: bytes) -> _Open:
        if step.step == 0:
            if step.session_id in self.sessions:
                raise RequestError(f"session {step.session_id!r} is already open on this stream")
            self.sessions[step.session_id] = _Open(self.runner.open_session(self.backend, step, client))
        opened = self.sessions.get(step.session_id)
        if opened is None:
            raise NotFound(
                f"unknown session {step.session_id!r} on this stream: never opened by a step 0, or closed "
                "(by its client, by a failed step, or idle past --session-timeout)"
            )
        return opened

    async def _run(self, opened: _Open, step: pb.Step, client: bytes) -> None:
        try:
            async with opened.lock:
                if self.sessions.get(step.session_id) is not opened:
                    raise NotFound(
                        f"session {step.session_id!r} was closed before this step ran (an earlier one failed)"
                    )
                result = await self.runner.run_step(self.backend, opened.session, step, client)
        except (RequestError, tensor_codec.TensorFormatError) as e:
            self._close(step.session_id, of=opened)
            self._failed(step, e)
            return
        except Exception as e:  # a bug: this session ends with INTERNAL, the stream and the others carry on
            log.exception("step %d of session %r failed", step.step, step.session_id)
            self._close(step.session_id, of=opened)
            self._failed(step, e, "INTERNAL")
            return
        self.results.append(result)  # the list of the next reply (not the one there was before the await)
        self._due()

    def _close(self, session_id: str, of: _Open | None = None, cancel: bool = False) -> None:
        """Frees a session (`of`: only if it is still that one); `cancel`: its client will read no more of it."""
        opened = self.sessions.get(session_id)
        if opened is None or (of is not None and opened is not of):
            return
        del self.sessions[session_id]
        if cancel:
            for task in opened.running:
                task.cancel()
        self.backend.close_session(opened.session)

    def _failed(self, step: pb.Step, error: Exception, status: str | None = None) -> None:
        status = status or getattr(error, "status", "INVALID_ARGUMENT")
        self.errors.append(pb.StepError(session_id=step.session_id, step=step.step, status=status, message=str(error)))
        self._due()

    def _due(self) -> None:
        """A reply goes out once the steps finishing together have all been handled: two loop turns from now
        (the runner hands a batch's outputs to the loop one after another)."""
        if not self._flush_due:
            self._flush_due = True
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self.results or self.errors:
            self.unsent += len(self.results) + len(self.errors)
            self.replies.put_nowait(pb.StepBatchResult(results=self.results, errors=self.errors))
            self.results, self.errors = [], []
