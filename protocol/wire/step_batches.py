"""The client end of StepBatches: the steps of every session this client runs on a node share one stream.

A session's step is handed here instead of being written on a stream of its own (GrpcNodeSession). Steps
handed over within the same turns of the event loop leave as one signed StepBatch: the head batcher wakes
every session of a round at once, and a node's reply wakes every session it answers at once, so a round
of N sessions is one message each way per node instead of N (node/step_batches.py is the other end). Each
reply is checked to be signed by the node and to name a batch sent on this stream; its results go to the
steps waiting for them, its errors fail theirs alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from grpc import aio

from . import torchnode_pb2 as pb
from .node_client import NodeError

if TYPE_CHECKING:
    from .grpc_node import GrpcNodeClient

SENT_KEPT = 256  # signatures of the latest batches sent: a reply must name one of them


class StepBatcher:
    """One StepBatches stream to a node, opened by the first batched session and shared by the rest."""

    def __init__(self, node: GrpcNodeClient):
        self.node = node
        self.call: aio.StreamStreamCall | None = None
        self.epoch = 0  # the stream's number: it grows when a stream ends (its sessions are gone on the node)
        self.waiting: dict[tuple[str, int], asyncio.Future[pb.StepResult]] = {}  # (session id, step) -> reply
        self.outbox: list[pb.Step] = []
        self.closing: list[str] = []
        self.sent: deque[bytes] = deque(maxlen=SENT_KEPT)
        self.batches_sent = 0  # StepBatch messages written, over every stream (steps per message = the gain)
        self._sender: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None  # held: the loop keeps only weak references to tasks
        self._opening = asyncio.Lock()

    async def open(self, timeout: float | None) -> int:
        """The epoch of the open stream (opened now if none is): a session opened on it passes it to `exchange`."""
        async with self._opening:
            if self.call is None:
                stub = await self.node.stub(timeout)
                await self.node.audience(timeout)
                self.call = stub.StepBatches()
                self._reader = asyncio.get_running_loop().create_task(self._read(self.call))
            return self.epoch

    async def exchange(self, request: pb.Step, epoch: int, timeout: float | None) -> pb.StepResult:
        """Sends a step with the next batch and waits for its result."""
        if epoch != self.epoch or self.call is None:
            raise NodeError(self.node.address, "the StepBatches stream this session was opened on ended", "UNAVAILABLE")
        key = (request.session_id, request.step)
        future = self.waiting[key] = asyncio.get_running_loop().create_future()
        self.outbox.append(request)
        self._kick()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise NodeError(self.node.address, f"no reply within {timeout}s", "DEADLINE_EXCEEDED") from None
        finally:
            self.waiting.pop(key, None)

    def close_session(self, session_id: str, epoch: int) -> None:
        """Tells the node (with the next batch) to free a session opened on this stream; no reply."""
        if epoch == self.epoch and self.call is not None:
            self.closing.append(session_id)
            self._kick()

    def _kick(self) -> None:
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        """Writes what the sessions handed over, one batch per write; steps handed over during a write go
        with the next."""
        call = None
        try:
            await asyncio.sleep(0)  # a turn more for sessions woken in the same round
            while (self.outbox or self.closing) and (call := self.call) is not None:
                batch = pb.StepBatch(steps=self.outbox, close=self.closing)
                self.outbox, self.closing = [], []
                signed = self.node.sign("StepBatches", batch)
                self.sent.append(signed.auth.signature)
                await call.write(signed)
                self.batches_sent += 1
        except aio.AioRpcError as e:
            self._end(call, await self.node.call_error(e))
        except asyncio.InvalidStateError:  # the stream already ended: its reader says why
            pass
        finally:
            self._sender = None

    async def _read(self, call: aio.StreamStreamCall) -> None:
        address = self.node.address
        try:
            async for reply in call:
                self.node.check("StepBatches", reply)
                if reply.auth.in_reply_to not in self.sent:
                    raise NodeError(address, "rejected reply: it answers no StepBatch this client sent on the stream")
                for result in reply.results:
                    _settle(self.waiting.get((result.session_id, result.step)), result)
                for error in reply.errors:
                    failed = NodeError(address, f"step {error.step}: {error.message}", error.status or None)
                    _settle(self.waiting.get((error.session_id, error.step)), failed)
            code = await call.code()
            ended = NodeError(address, f"stream ended: {code} {await call.details() or ''}".strip(), code.name)
        except aio.AioRpcError as e:
            ended = await self.node.call_error(e)
        except NodeError as e:
            call.cancel()
            ended = e
        except asyncio.CancelledError:
            ended = NodeError(address, "the client closed the stream", "CANCELLED")
        self._end(call, ended)

    def _end(self, call: aio.StreamStreamCall | None, error: NodeError) -> None:
        """The stream is over: every step waiting on it fails with `error`; the next session opens a new one."""
        if call is None or self.call is not call:
            return
        self.call, self.epoch = None, self.epoch + 1
        self.outbox, self.closing = [], []
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """Done writing: the node answers what was sent, frees the stream's sessions and ends the stream."""
        if self.call is not None and not self.call.done():
            try:
                await self.call.done_writing()
            except (aio.AioRpcError, asyncio.InvalidStateError):
                pass


def _settle(future: asyncio.Future | None, outcome: pb.StepResult | NodeError) -> None:
    if future is None or future.done():  # nobody waits any more (it timed out): dropped
        return
    if isinstance(outcome, NodeError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
