"""`NodeClient` over signed gRPC: the client end of proto/torchnode.proto.

Everything a node sends back is checked against the key the client expects for it (from the DHT record,
or pinned on first use), so a man in the middle or a node swapped behind an address is caught on the
first message.
"""

from __future__ import annotations

import asyncio
from dataclasses import fields

import grpc
import torch
from grpc import aio

from . import signing, tensor_codec
from . import torchnode_pb2 as pb
from . import torchnode_pb2_grpc as pb_grpc
from .identity import Identity
from .node_client import NodeClient, NodeError, NodeInfo, NodeSession, SessionSpec

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
INFO_FIELDS = tuple(f.name for f in fields(NodeInfo))


def info_message(info: NodeInfo) -> pb.InfoResponse:
    """The node side of the mapping: NodeInfo -> InfoResponse, field for field."""
    return pb.InfoResponse(**{name: getattr(info, name) for name in INFO_FIELDS})



def _error(address: str, e: aio.AioRpcError) -> NodeError:
    return NodeError(address, e.details() or str(e.code()), e.code().name)


class GrpcNodeClient(NodeClient):
    """A node at host:port over signed gRPC; one channel, shared by its calls and sessions."""

    def __init__(
        self,
        address: str,
        identity: Identity,
        expected_key: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.address, self.identity, self.expected_key = address, identity, expected_key
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self.channel = aio.insecure_channel(address, options=options)
        self.stub = pb_grpc.NodeStub(self.channel)

    def check(self, method: str, message) -> None:
        """Accepts a reply only if signed by the expected key (pinned from the first reply if none)."""
        try:
            key = signing.check(method, message, expected_key=self.expected_key)
        except signing.AuthError as e:
            raise NodeError(self.address, f"rejected reply: {e}") from None
        if self.expected_key is None:
            self.expected_key = key  # trust on first use; DHT records pin it up front

    async def info(self, timeout: float | None = 10.0) -> NodeInfo:
        try:
            reply = await self.stub.Info(signing.sign(self.identity, "Info", pb.InfoRequest()), timeout=timeout)
        except aio.AioRpcError as e:
            raise _error(self.address, e) from None
        self.check("Info", reply)
        if reply.public_key != reply.auth.public_key:
            raise NodeError(self.address, "Info names a public key other than the one that signed it")
        return NodeInfo(**{name: getattr(reply, name) for name in INFO_FIELDS})

    def open_session(self, spec: SessionSpec) -> NodeSession:
        return GrpcNodeSession(self, spec)

    async def close(self) -> None:
        await self.channel.close()


class GrpcNodeSession(NodeSession):
    """The client end of one Inference stream: send a Step, read its StepResult, in lock step."""

    def __init__(self, node: GrpcNodeClient, spec: SessionSpec):
        self.node, self.spec = node, spec
        self.call = node.stub.Inference()
        self.next_step = 0

    async def step(self, hidden: torch.Tensor, position: int, timeout: float | None) -> torch.Tensor:
        s, address = self.spec, self.node.address
        request = pb.Step(
            session_id=s.session_id, step=self.next_step, position=position,
            wire_dtype=tensor_codec.dtype_name(s.wire_dtype), hidden=tensor_codec.encode(hidden, s.wire_dtype),
        )  # fmt: skip
        if self.next_step == 0:
            request.max_length, request.batch_size = s.max_length, s.batch_size
            request.start_block, request.end_block = s.start, s.end
        self.next_step += 1
        try:
            await asyncio.wait_for(self.call.write(signing.sign(self.node.identity, "Inference", request)), timeout)
            reply = await asyncio.wait_for(self.call.read(), timeout)
        except aio.AioRpcError as e:
            raise _error(address, e) from None
        except asyncio.InvalidStateError:  # the stream already ended: the node closed it or died
            raise NodeError(address, await self._ended(), (await self.call.code()).name) from None
        except TimeoutError:
            self.call.cancel()
            raise NodeError(address, f"no reply within {timeout}s", grpc.StatusCode.DEADLINE_EXCEEDED.name) from None
        if reply is aio.EOF:
            raise NodeError(address, await self._ended(), (await self.call.code()).name)
        self.node.check("Inference", reply)
        if reply.step != request.step:
            raise NodeError(address, f"reply to step {reply.step}, expected {request.step}")
        if not reply.HasField("hidden"):
            raise NodeError(address, f"reply to step {request.step} carries no hidden states")
        try:
            return tensor_codec.decode(reply.hidden)
        except tensor_codec.TensorFormatError as e:
            raise NodeError(address, f"malformed hidden states in reply: {e}") from None

    async def _ended(self) -> str:
        return f"stream ended: {await self.call.code()} {await self.call.details() or ''}".strip()

    def abort(self) -> None:
        self.call.cancel()

    async def close(self) -> None:
        if not self.call.done():
            await self.call.done_writing()
