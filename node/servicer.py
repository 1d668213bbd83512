"""The gRPC face of a node: decode, call the backend, encode; map RequestError to a status.

Signatures are handled by node/auth_interceptor.py before and after these methods run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc import aio

from ..protocol.version import UNSAID_PROTOCOL, protocol, protocol_major, speaks, upgrade_advice
from ..protocol.wire import tensor_codec
from ..protocol.wire import torchnode_pb2 as pb
from ..protocol.wire import torchnode_pb2_grpc as pb_grpc
from ..protocol.wire.grpc_node import info_message
from ..protocol.wire.node_client import PushTarget
from . import lora_training, push
from .errors import FailedPrecondition, IdleTimeout, NotFound, RequestError
from .span_backend import Session, SpanBackend
from .step_batches import StepBatchStream


def _reply_dtype(requested: str, x_dtype):
    return tensor_codec.dtype_from_name(requested) if requested else x_dtype


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, backend: SpanBackend, public_key: bytes, pusher: push.Pusher | None = None):
        self.backend, self.public_key = backend, public_key
        limits = backend.limits
        self.pusher = pusher  # node-to-node push (node/push.py)
        self.pushes = push.PushBox(max_waiting=limits.max_pushed, ttl=limits.push_wait)

    async def Info(self, request: pb.InfoRequest, context: aio.ServicerContext) -> pb.InfoResponse:
        return info_message(self.backend.describe(self.public_key))

    async def Forward(self, request: pb.ForwardRequest, context: aio.ServicerContext) -> pb.ForwardResponse:
        backend = self.backend
        try:
            x = tensor_codec.decode(request.hidden)
            reply_dtype = _reply_dtype(request.wire_dtype, x.dtype)
            if request.lora:  # a client fine-tuning: its own LoRA weights for this pass (node/lora_training.py)
                lora = _lora_tensors(request.lora)
                backend.check_reply(x, reply_dtype)
                out = await lora_training.forward(
                    backend, x, request.start_block, request.end_block, lora, request.lora_scale
                )
            else:
                out = await backend.forward(
                    x, request.start_block, request.end_block, reply_dtype, client=request.auth.public_key
                )
        except (RequestError, tensor_codec.TensorFormatError) as e:
            await context.abort(status(e), str(e))
        return pb.ForwardResponse(hidden=tensor_codec.encode(out, reply_dtype))

    async def Backward(self, request: pb.BackwardRequest, context: aio.ServicerContext) -> pb.BackwardResponse:
        try:
            x, grad = tensor_codec.decode(request.hidden), tensor_codec.decode(request.grad_output)
            reply_dtype = _reply_dtype(request.wire_dtype, x.dtype)
            self.backend.check_reply(x, reply_dtype)
            grad_x, grads = await lora_training.backward(
                self.backend,
                x,
                grad,
                request.start_block,
                request.end_block,
                _lora_tensors(request.lora),
                request.lora_scale,
            )
        except (RequestError, tensor_codec.TensorFormatError) as e:
            await context.abort(status(e), str(e))
        return pb.BackwardResponse(
            grad_hidden=tensor_codec.encode(grad_x, reply_dtype),
            lora_grads=[pb.LoraTensor(name=n, tensor=tensor_codec.encode(g, reply_dtype)) for n, g in grads.items()],
        )

    async def Inference(
        self, request_iterator: AsyncIterator[pb.Step], context: aio.ServicerContext
    ) -> AsyncIterator[pb.StepResult]:
        backend = self.backend  # a rebalance swaps self.backend; this stream stays on the span it opened
        session = None
        try:
            while True:
                try:
                    async with asyncio.timeout(backend.limits.session_idle_timeout):  # no task per step (wait_for)
                        step = await anext(request_iterator, None)
                except TimeoutError:
                    raise IdleTimeout(
                        f"session idle for {backend.limits.session_idle_timeout:.0f}s (--session-timeout); closed"
                    ) from None
                if step is None:
                    return
                if session is None:
                    if step.step != 0:
                        raise NotFound(f"unknown session {step.session_id!r}: a stream must open it with step 0")
                    session = self.open_session(backend, step, client=step.auth.public_key)
                elif step.session_id != session.id:
                    raise NotFound(f"unknown session {step.session_id!r}: this stream serves {session.id!r}")
                yield await self.run_step(backend, session, step, step.auth.public_key)
        except (RequestError, tensor_codec.TensorFormatError) as e:
            await context.abort(status(e), str(e))
        finally:
            if session is not None:
                backend.close_session(session)

    @staticmethod
    def open_session(backend: SpanBackend, step: pb.Step, client: bytes) -> Session:
        """The session a step 0 opens (its client's key: its fair share), after the protocol check."""
        check_protocol(step.protocol or UNSAID_PROTOCOL)
        return backend.open_session(
            step.session_id,
            step.start_block,
            step.end_block,
            step.batch_size or 1,
            step.max_length,
            step.adapter,
            client,
        )

    async def run_step(self, backend: SpanBackend, session: Session, step: pb.Step, client: bytes) -> pb.StepResult:
        """One step of an open session (from an Inference stream or a StepBatch): its input (sent, or waited
        for by push), the pass, the reply, and the push on when asked."""
        x = tensor_codec.decode(step.hidden) if step.HasField("hidden") else None
        x, digest = await push.step_input(
            self.pushes, x, step.push_token, step.push_from, client, backend.limits.session_idle_timeout
        )
        reply_dtype = _reply_dtype(step.wire_dtype, x.dtype if x is not None else None)
        out = await backend.step(session, step.step, x, step.position, reply_dtype)
        result = pb.StepResult(session_id=session.id, step=step.step, cached_length=session.length, input_digest=digest)
        if out is not None:
            result.hidden.CopyFrom(tensor_codec.encode(out, reply_dtype))
            if step.HasField("push_to"):
                result.push_error = await self._push(step.push_to, out.to(reply_dtype))
        return result

    async def StepBatches(
        self, request_iterator: AsyncIterator[pb.StepBatch], context: aio.ServicerContext
    ) -> AsyncIterator[pb.StepBatchResult]:
        """Many sessions' steps per message (node/step_batches.py)."""
        try:
            async for reply in StepBatchStream(self, self.backend).serve(request_iterator):
                yield reply
        except RequestError as e:
            await context.abort(status(e), str(e))

    async def _push(self, target: pb.PushTarget, out) -> str:
        if self.pusher is None:
            return "this node does not push"
        return await self.pusher.push(PushTarget(target.address, target.public_key, target.token), out)

    async def Push(
        self, request_iterator: AsyncIterator[pb.Pushed], context: aio.ServicerContext
    ) -> AsyncIterator[pb.PushAck]:
        """Inputs pushed by the previous node of a chain (or a session's client) for steps that name them."""
        try:
            async for message in request_iterator:
                self.pushes.deliver(message.token, message.auth.public_key, tensor_codec.decode(message.hidden))
                yield pb.PushAck(token=message.token)
        except tensor_codec.TensorFormatError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


def check_protocol(client: str) -> None:
    """A session from a client of another protocol major is refused, saying which side must upgrade."""
    try:
        ok = speaks(client)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if not ok:
        ours, theirs = protocol_major(protocol()), protocol_major(client)
        advice = upgrade_advice(protocol(), client, "this node")
        raise FailedPrecondition(
            f"protocol mismatch: this node speaks protocol {ours}, this client speaks {theirs}: {advice}"
        )


def _lora_tensors(items) -> dict:
    names = [t.name for t in items]
    if len(set(names)) != len(names):
        raise RequestError("a LoRA tensor name appears twice")
    return {t.name: tensor_codec.decode(t.tensor) for t in items}


def status(error: Exception) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, getattr(error, "status", "INVALID_ARGUMENT"))
