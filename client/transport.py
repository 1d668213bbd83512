"""One signed gRPC connection to one node: Info, Forward, and inference streams.

Everything a node sends back is checked against the key the client expects for it (pinned from the
first Info reply, or given by the caller from a trusted source such as a DHT record), so a
man-in-the-middle or a node swapped behind an address is caught on the first message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import torch
from grpc import aio

from ..protocol import signing, tensor_codec
from ..protocol import torchnode_pb2 as pb
from ..protocol import torchnode_pb2_grpc as pb_grpc
from ..protocol.identity import Identity

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


class NodeError(Exception):
    """A node failed or refused a call; `code` is the gRPC status (None for a bad signature)."""

    def __init__(self, address: str, message: str, code: grpc.StatusCode | None = None):
        super().__init__(f"{address}: {message}")
        self.address, self.code = address, code


@dataclass(frozen=True)
class NodeInfo:
    address: str
    model: str
    revision: str
    start: int
    end: int
    total_blocks: int
    hidden_size: int
    dtype: str
    throughput: float
    cache_bytes_free: int
    sessions_free: int
    version: str
    public_key: bytes


class NodeClient:
    def __init__(
        self,
        address: str,
        identity: Identity,
        expected_key: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.address, self.identity, self.expected_key = address, identity, expected_key
        self.channel = aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.stub = pb_grpc.NodeStub(self.channel)

    def _check(self, method: str, message) -> None:
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
            raise NodeError(self.address, e.details() or str(e.code()), e.code()) from None
        self._check("Info", reply)
        if reply.public_key != reply.auth.public_key:
            raise NodeError(self.address, "Info names a public key other than the one that signed it")
        return NodeInfo(
            self.address, reply.model, reply.revision, reply.start_block, reply.end_block, reply.total_blocks,
            reply.hidden_size, reply.dtype, reply.throughput, reply.cache_bytes_free, reply.sessions_free,
            reply.version, bytes(reply.public_key),
        )  # fmt: skip

    async def forward(
        self, hidden: torch.Tensor, start: int, end: int, wire_dtype: torch.dtype, timeout: float | None = 30.0
    ) -> torch.Tensor:
        request = pb.ForwardRequest(
            hidden=tensor_codec.encode(hidden, wire_dtype),
            start_block=start,
            end_block=end,
            wire_dtype=tensor_codec.dtype_name(wire_dtype),
        )
        try:
            reply = await self.stub.Forward(signing.sign(self.identity, "Forward", request), timeout=timeout)
        except aio.AioRpcError as e:
            raise NodeError(self.address, e.details() or str(e.code()), e.code()) from None
        self._check("Forward", reply)
        return tensor_codec.decode(reply.hidden)

    def open_stream(self) -> HopStream:
        return HopStream(self)

    async def close(self) -> None:
        await self.channel.close()


class HopStream:
    """The client end of one Inference stream: send a Step, read its StepResult, in lock step."""

    def __init__(self, node: NodeClient):
        self.node = node
        self.call = node.stub.Inference()
        self.next_step = 0

    async def step(
        self, request: pb.Step, wire_dtype: torch.dtype, timeout: float | None
    ) -> tuple[torch.Tensor | None, int]:
        """Sends one step (its index is filled in here) and returns (output hidden, cached length)."""
        request.step = self.next_step
        request.wire_dtype = tensor_codec.dtype_name(wire_dtype)
        self.next_step += 1
        try:
            await asyncio.wait_for(self.call.write(signing.sign(self.node.identity, "Inference", request)), timeout)
            reply = await asyncio.wait_for(self.call.read(), timeout)
        except aio.AioRpcError as e:
            raise NodeError(self.node.address, e.details() or str(e.code()), e.code()) from None
        except asyncio.InvalidStateError:  # the stream already ended: the node closed it or died
            raise NodeError(self.node.address, await self._ended(), await self.call.code()) from None
        except TimeoutError:
            self.call.cancel()
            raise NodeError(self.node.address, f"no reply within {timeout}s", grpc.StatusCode.DEADLINE_EXCEEDED)
        if reply is aio.EOF:
            raise NodeError(self.node.address, await self._ended(), await self.call.code())
        self.node._check("Inference", reply)
        if reply.step != request.step:
            raise NodeError(self.node.address, f"reply to step {reply.step}, expected {request.step}")
        hidden = tensor_codec.decode(reply.hidden) if reply.HasField("hidden") else None
        return hidden, reply.cached_length

    async def _ended(self) -> str:
        return f"stream ended: {await self.call.code()} {await self.call.details() or ''}".strip()

    async def close(self) -> None:
        if not self.call.done():
            await self.call.done_writing()
