"""Signature checks on every incoming message and signatures on every outgoing one, for all RPCs.

Kept out of the servicer (Flower-style): a request whose envelope fails never reaches a handler, and
handlers never think about keys. Stream requests are checked message by message.
"""

from __future__ import annotations

import grpc
from grpc import aio

from ..protocol import signing
from ..protocol.identity import Identity


class AuthInterceptor(aio.ServerInterceptor):
    def __init__(self, identity: Identity, replay_guard: signing.ReplayGuard):
        self.identity, self.replay_guard = identity, replay_guard

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _verify(self, method: str, message, context: aio.ServicerContext) -> None:
        try:
            signing.check(method, message, replay_guard=self.replay_guard)
        except signing.AuthError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    def _unary(self, method, behavior):
        async def wrapped(request, context):
            await self._verify(method, request, context)
            return signing.sign(self.identity, method, await behavior(request, context))

        return wrapped

    def _stream(self, method, behavior):
        async def wrapped(request_iterator, context):
            async def verified():
                async for request in request_iterator:
                    await self._verify(method, request, context)
                    yield request

            async for response in behavior(verified(), context):
                yield signing.sign(self.identity, method, response)

        return wrapped
