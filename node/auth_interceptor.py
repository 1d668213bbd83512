"""Signature checks on every incoming message and signatures on every outgoing one, for all RPCs.

Kept out of the servicer (Flower-style): a request whose envelope fails never reaches a handler, and
handlers never think about keys. Stream requests are checked message by message.

A request must be addressed to this node (its `audience` is our public key), so one captured on its way
to another node is refused here. `Info` may name no node: a client that reaches a node by address over
plaintext (--insecure) learns the node's key from its first Info reply; Info does nothing and reveals
only what the node announces. Each reply names the request it answers (its signature); the servicer
answers a stream's steps one by one, in order, so replies are matched to requests first in, first out. A
StepBatches stream answers steps as they finish, several batches' in one reply or one batch's over several:
its replies name the latest request the node had read.

Requests arrive here as raw bytes and are parsed here too: left to gRPC, bytes that are not a protobuf
message would end the call with UNKNOWN and a traceback in the node's log, instead of INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections import deque

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from ..protocol.wire import signing
from ..protocol.wire.identity import Identity


class AuthInterceptor(aio.ServerInterceptor):
    UNADDRESSED_OK = frozenset({"Info"})  # methods whose requests may omit the audience
    ANSWER_LATEST = frozenset({"StepBatches"})  # streams whose replies are not one per request

    def __init__(self, identity: Identity, replay_guard: signing.ReplayGuard):
        self.identity, self.replay_guard = identity, replay_guard

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        parse = handler.request_deserializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, parse, handler.unary_unary),
                request_deserializer=None,  # raw bytes: parsed in _parse
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(method, parse, handler.stream_stream),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        return handler

    @staticmethod
    async def _parse(method: str, parse, raw: bytes, context: aio.ServicerContext):
        try:
            return parse(raw)
        except DecodeError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {method} message: {e}")

    async def _verify(self, method: str, message, context: aio.ServicerContext) -> None:
        audience = self.identity.public_key
        if method in self.UNADDRESSED_OK and message.HasField("auth") and not message.auth.audience:
            audience = None
        try:
            signing.check(method, message, replay_guard=self.replay_guard, audience=audience)
        except signing.AuthError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    def _unary(self, method, parse, behavior):
        async def wrapped(raw, context):
            request = await self._parse(method, parse, raw, context)
            await self._verify(method, request, context)
            reply = await behavior(request, context)
            return signing.sign(self.identity, method, reply, in_reply_to=request.auth.signature)

        return wrapped

    def _stream(self, method, parse, behavior):
        async def wrapped(request_iterator, context):
            latest = method in self.ANSWER_LATEST
            unanswered: deque[bytes] = deque(maxlen=1 if latest else None)  # verified requests' signatures

            async def verified():
                async for raw in request_iterator:
                    request = await self._parse(method, parse, raw, context)
                    await self._verify(method, request, context)
                    unanswered.append(request.auth.signature)
                    yield request

            async for response in behavior(verified(), context):
                if latest:
                    answers = unanswered[-1] if unanswered else b""
                else:
                    answers = unanswered.popleft() if unanswered else b""
                yield signing.sign(self.identity, method, response, in_reply_to=answers)

        return wrapped
