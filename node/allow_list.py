"""Private swarms: a node serves only the clients its --allow-keys file lists.

Placed after AuthInterceptor in the server's interceptor list, so it sees requests already parsed and
their signatures checked: the signer's key is known to be genuine, and only its membership is asked
here. Everyone else gets PERMISSION_DENIED, on every method, Info included.
"""

from __future__ import annotations

import grpc
from grpc import aio

from ..protocol.wire.identity import peer_id_of


def allow_list(allowed: frozenset[bytes] | None) -> list[aio.ServerInterceptor]:
    """The interceptor to put after AuthInterceptor: none in a public swarm."""
    return [AllowListInterceptor(allowed)] if allowed else []


class AllowListInterceptor(aio.ServerInterceptor):
    def __init__(self, allowed: frozenset[bytes]):
        self.allowed = allowed

    async def _check(self, request, context: aio.ServicerContext) -> None:
        key = bytes(request.auth.public_key)
        if key not in self.allowed:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client key {key.hex()} (peer {peer_id_of(key)}) is not on this node's allow list (--allow-keys)",
            )

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        kept = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            behavior = handler.unary_unary

            async def unary(request, context):
                await self._check(request, context)
                return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kept)
        if handler.stream_stream:
            stream_behavior = handler.stream_stream

            async def stream(request_iterator, context):
                async def allowed():
                    async for request in request_iterator:
                        await self._check(request, context)
                        yield request

                async for response in stream_behavior(allowed(), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream, **kept)
        return handler
