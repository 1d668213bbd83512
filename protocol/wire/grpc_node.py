"""`NodeClient` over signed gRPC on TLS: the client end of proto/torchnode.proto.

The channel is TLS, pinned to a certificate bound to the key the client expects for the node (from the
DHT record, or learned from the certificate on first use for --peers): see protocol/wire/tls.py. Everything a
node sends back is also signed by that key and names the request it answers, and every request names
the node it is for, so a man in the middle, a node swapped behind an address, or a message replayed
from elsewhere is caught on the first message. `insecure=True` (--insecure, debugging on loopback)
speaks plaintext; a client and node that disagree get a NodeError at once, never a hang.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import fields

import grpc
import torch
from grpc import aio

from .. import version
from ..version import UNSAID_PROTOCOL
from . import signing, tensor_codec, tls
from . import torchnode_pb2 as pb
from . import torchnode_pb2_grpc as pb_grpc
from .identity import Identity, peer_id_of
from .node_client import NodeClient, NodeError, NodeInfo, NodeSession, PushedStep, PushTarget, SessionSpec
from .step_batches import StepBatcher

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
INFO_FIELDS = tuple(f.name for f in fields(NodeInfo))
AGREE = "client and node must agree: both encrypted (the default), or both started with --insecure"


def info_message(info: NodeInfo) -> pb.InfoResponse:
    """The node side of the mapping: NodeInfo -> InfoResponse, field for field."""
    return pb.InfoResponse(**{name: getattr(info, name) for name in INFO_FIELDS})


class GrpcNodeClient(NodeClient):
    """A node at host:port over signed gRPC; one channel, shared by its calls and sessions.

    The channel is made on first use (TLS needs the node's certificate first). `encrypted` says how the
    node speaks once known: True (TLS), False (plaintext), None (not reached yet).
    """

    def __init__(
        self,
        address: str,
        identity: Identity,
        expected_key: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        insecure: bool = False,
    ):
        self.address, self.identity, self.expected_key, self.insecure = address, identity, expected_key, insecure
        self.options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self.encrypted: bool | None = None
        self.channel: aio.Channel | None = None
        self._stub: pb_grpc.NodeStub | None = None
        self._connecting = asyncio.Lock()
        self._push_call: aio.StreamStreamCall | None = None  # the Push stream to this node, opened by the first push
        self.signed_info = b""  # its latest Info reply, serialized with its signature
        self._pushing = asyncio.Lock()
        self.protocol: str | None = None  # what the node speaks, from its Info (None: not asked yet)
        self.step_batcher = StepBatcher(self)  # the StepBatches stream its batched sessions share

    @property
    def batches_steps(self) -> bool:
        """Whether the node takes many sessions' steps per message (StepBatches, protocol 1.1); known from its Info."""
        return self.protocol is not None and version.supports(self.protocol, version.STEP_BATCHES)

    async def stub(self, timeout: float | None = tls.DEFAULT_FETCH_TIMEOUT) -> pb_grpc.NodeStub:
        """The channel's stub, made on first use: over TLS, after the certificate's binding is checked."""
        async with self._connecting:
            if self._stub is None:
                if self.insecure:
                    self.channel = aio.insecure_channel(self.address, options=self.options)
                else:
                    pin = await self._pin(timeout)
                    self.channel = aio.secure_channel(
                        self.address, pin.credentials(), options=self.options + pin.options()
                    )
                self._stub = pb_grpc.NodeStub(self.channel)
        return self._stub

    async def _pin(self, timeout: float | None) -> tls.Pin:
        """The node's certificate, bound to the expected key (which it sets on first use)."""
        try:
            pin = await tls.pin(self.address, self.expected_key, timeout)
        except tls.BindingError as e:
            raise NodeError(
                self.address,
                f"TLS certificate is not bound to the expected key ({e}): refusing the channel "
                "(a man in the middle, or another node at this address)",
            ) from None
        except ssl.SSLError as e:
            self.encrypted = False
            raise NodeError(
                self.address, f"the node does not speak TLS ({e.reason or e}); {AGREE}", "UNAVAILABLE"
            ) from None
        except TimeoutError:
            raise NodeError(self.address, f"no TLS handshake within {timeout}s", "DEADLINE_EXCEEDED") from None
        except (OSError, ValueError) as e:
            raise NodeError(self.address, f"cannot connect: {e}", "UNAVAILABLE") from None
        self.expected_key, self.encrypted = pin.key, True  # trust on first use when no key was expected
        return pin

    async def call_error(self, e: aio.AioRpcError) -> NodeError:
        """A NodeError for a failed call; a plaintext client that reaches a TLS node is told so."""
        if self.insecure and e.code() == grpc.StatusCode.UNAVAILABLE and await self._speaks_tls():
            self.encrypted = True
            return NodeError(
                self.address, f"the node speaks TLS but this client runs with --insecure; {AGREE}", "UNAVAILABLE"
            )
        if not self.insecure and e.code() == grpc.StatusCode.UNAVAILABLE and "handshake" in (e.details() or "").lower():
            # the next call fetches the certificate again and checks its binding anew: a node that made a
            # new certificate (bound to the same key) is reached again, a man in the middle is not
            channel, self._stub, self.channel = self.channel, None, None
            if channel is not None:
                await channel.close()
            return NodeError(
                self.address,
                f"TLS handshake failed against the certificate pinned for peer "
                f"{peer_id_of(self.expected_key) if self.expected_key else '?'} "
                "(a man in the middle, or the node changed its certificate): "
                f"{e.details()}",
                "UNAVAILABLE",
            )
        return NodeError(self.address, e.details() or str(e.code()), e.code().name)

    async def _speaks_tls(self) -> bool:
        try:
            await tls.fetch_certificate(self.address, timeout=2.0)
        except (OSError, TimeoutError, ValueError):  # ssl.SSLError is an OSError
            return False
        return True

    def check(self, method: str, message, request=None) -> None:
        """Accepts a reply only if signed by the expected key (pinned from the first reply if none) and,
        given the `request`, only if it answers that request."""
        try:
            key = signing.check(method, message, expected_key=self.expected_key, reply_to=request)
        except signing.AuthError as e:
            raise NodeError(self.address, f"rejected reply: {e}") from None
        if self.expected_key is None:
            self.expected_key = key  # plaintext only: over TLS the certificate pinned the key already

    def sign(self, method: str, request):
        """`request` signed by this client and addressed to the node (by its key, once known)."""
        return signing.sign(self.identity, method, request, audience=self.expected_key or b"")

    async def info(self, timeout: float | None = 10.0) -> NodeInfo:
        stub = await self.stub(timeout)
        request = self.sign("Info", pb.InfoRequest())
        try:
            reply = await stub.Info(request, timeout=timeout)
        except aio.AioRpcError as e:
            raise await self.call_error(e) from None
        self.check("Info", reply, request)
        if self.insecure:
            self.encrypted = False
        if reply.public_key != reply.auth.public_key:
            raise NodeError(self.address, "Info names a public key other than the one that signed it")
        self.signed_info = reply.SerializeToString()  # a fraud proof says what the node claimed to compute in
        speaks = reply.protocol or UNSAID_PROTOCOL
        try:
            version.protocol_major(speaks)
        except ValueError as e:
            raise NodeError(self.address, f"Info: {e}") from None
        said = {"adapters": tuple(reply.adapters), "protocol": speaks}
        self.protocol = speaks
        return NodeInfo(**{name: getattr(reply, name) for name in INFO_FIELDS} | said)

    async def audience(self, timeout: float | None) -> bytes:
        """The node's key, to address requests to; over plaintext with no key given, its first Info tells."""
        if self.expected_key is None:
            await self.info(timeout)  # sets it, or raises
        if self.expected_key is None:
            raise NodeError(self.address, "the node's Info named no key to address requests to")
        return self.expected_key

    def open_session(self, spec: SessionSpec) -> NodeSession:
        return GrpcNodeSession(self, spec)

    async def _unary(self, method: str, request, timeout: float | None):
        """A signed unary call addressed to the node; its reply checked to be the node's answer to it."""
        stub = await self.stub(timeout)
        await self.audience(timeout)
        request = self.sign(method, request)
        try:
            reply = await getattr(stub, method)(request, timeout=timeout)
        except aio.AioRpcError as e:
            raise await self.call_error(e) from None
        self.check(method, reply, request)
        return reply

    async def train_forward(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        lora: dict[str, torch.Tensor],
        scale: float,
        timeout: float | None,
    ) -> torch.Tensor:
        request = pb.ForwardRequest(
            hidden=tensor_codec.encode(hidden),
            start_block=start,
            end_block=end,
            lora=_lora_message(lora),
            lora_scale=scale,
        )
        return self._decode((await self._unary("Forward", request, timeout)).hidden)

    async def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        start: int,
        end: int,
        lora: dict[str, torch.Tensor],
        scale: float,
        timeout: float | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        request = pb.BackwardRequest(
            hidden=tensor_codec.encode(hidden),
            grad_output=tensor_codec.encode(grad_output),
            start_block=start,
            end_block=end,
            lora=_lora_message(lora),
            lora_scale=scale,
        )
        reply = await self._unary("Backward", request, timeout)
        grads = {t.name: self._decode(t.tensor) for t in reply.lora_grads}
        if set(grads) != set(lora):
            raise NodeError(self.address, "Backward returned gradients for other LoRA tensors than were sent")
        return self._decode(reply.grad_hidden), grads

    def _decode(self, tensor: pb.Tensor) -> torch.Tensor:
        try:
            return tensor_codec.decode(tensor)
        except tensor_codec.TensorFormatError as e:
            raise NodeError(self.address, f"malformed tensor in reply: {e}") from None

    async def push(self, token: bytes, hidden: torch.Tensor, timeout: float | None) -> None:
        """Writes a signed Push on one long-lived stream to the node: no round trip once the stream is open
        (the acks are read in the background). A failed write drops the stream; the next push opens one anew."""
        async with self._pushing:
            try:
                if self._push_call is None or self._push_call.done():
                    stub = await self.stub(timeout)
                    await self.audience(timeout)
                    self._push_call = stub.Push()
                    asyncio.get_running_loop().create_task(self._drain_acks(self._push_call))
                message = self.sign("Push", pb.Pushed(token=token, hidden=tensor_codec.encode(hidden)))
                async with asyncio.timeout(timeout):  # no task per write, as wait_for would make
                    await self._push_call.write(message)
            except aio.AioRpcError as e:
                self._push_call = None
                raise await self.call_error(e) from None
            except (asyncio.InvalidStateError, TimeoutError) as e:
                call, self._push_call = self._push_call, None
                if call is not None:
                    call.cancel()
                raise NodeError(self.address, f"push stream failed: {e!r}", "UNAVAILABLE") from None

    async def _drain_acks(self, call) -> None:
        """Reads the node's acks (signed by it) so that the stream never stalls on unread replies."""
        try:
            async for ack in call:
                self.check("Push", ack)
        except (aio.AioRpcError, NodeError, asyncio.CancelledError):
            pass
        if self._push_call is call:
            self._push_call = None

    async def close(self) -> None:
        if self._push_call is not None:
            self._push_call.cancel()
        await self.step_batcher.close()
        if self.channel is not None:
            await self.channel.close()


def _lora_message(lora: dict[str, torch.Tensor]) -> list[pb.LoraTensor]:
    return [pb.LoraTensor(name=name, tensor=tensor_codec.encode(t.detach())) for name, t in lora.items()]


class GrpcNodeSession(NodeSession):
    """The client end of one session: send a Step, read its StepResult, in lock step.

    Its steps go on the node's shared StepBatches stream (one message for every session's step of a round)
    when the spec allows it, the node speaks it and no fraud proof is kept (those need each step signed on
    its own); otherwise on an Inference stream of its own. The choice is made at the first step, when the
    stream opens (the channel may still have to be made then)."""

    def __init__(self, node: GrpcNodeClient, spec: SessionSpec):
        self.node, self.spec = node, spec
        self.call: aio.StreamStreamCall | None = None
        self.batched: int | None = None  # the epoch of the StepBatches stream it opened on (None: its own stream)
        self.next_step = 0
        self.kept: list[tuple[bytes, bytes]] | None = None  # signed exchanges not taken yet (None: none kept)

    def keep_exchanges(self) -> None:
        if self.kept is None:
            self.kept = []

    def take_exchanges(self) -> list[tuple[bytes, bytes]]:
        taken, self.kept = self.kept or [], [] if self.kept is not None else None
        return taken

    async def step(self, hidden: torch.Tensor, position: int, timeout: float | None) -> torch.Tensor:
        return self._hidden(await self._exchange(self._request(hidden, position), timeout))

    async def pushed_step(
        self,
        hidden: torch.Tensor | None,
        position: int,
        timeout: float | None,
        push_to: PushTarget | None = None,
        push_token: bytes = b"",
        push_from: bytes = b"",
    ) -> PushedStep:
        request = self._request(hidden, position)
        if push_to is not None:
            request.push_to.CopyFrom(
                pb.PushTarget(address=push_to.address, public_key=push_to.public_key, token=push_to.token)
            )
        request.push_token, request.push_from = push_token, push_from
        reply = await self._exchange(request, timeout)
        return PushedStep(self._hidden(reply), reply.push_error, reply.input_digest)

    def _request(self, hidden: torch.Tensor | None, position: int) -> pb.Step:
        s = self.spec
        request = pb.Step(
            session_id=s.session_id,
            step=self.next_step,
            position=position,
            wire_dtype=tensor_codec.dtype_name(s.wire_dtype),
        )
        if hidden is not None:
            request.hidden.CopyFrom(tensor_codec.encode(hidden, s.wire_dtype))
        if self.next_step == 0:
            request.max_length, request.batch_size = s.max_length, s.batch_size
            request.start_block, request.end_block = s.start, s.end
            request.adapter = s.adapter
            request.protocol = version.protocol()  # a node of another major refuses the session
        self.next_step += 1
        return request

    async def _exchange(self, request: pb.Step, timeout: float | None) -> pb.StepResult:
        """Sends one signed step and reads its reply, checked to be the node's answer to it."""
        node, address = self.node, self.node.address
        try:
            if request.step == 0 and self.spec.batched and self.kept is None and node.batches_steps:
                self.batched = await node.step_batcher.open(timeout)
            if self.batched is not None:
                try:
                    reply = await node.step_batcher.exchange(request, self.batched, timeout)
                except NodeError:
                    self.abort()
                    raise
            else:
                reply = await self._own_exchange(request, timeout)
        except aio.AioRpcError as e:
            raise await node.call_error(e) from None
        if reply.step != request.step:
            raise NodeError(address, f"reply to step {reply.step}, expected {request.step}")
        if not reply.HasField("hidden"):
            raise NodeError(address, f"reply to step {request.step} carries no hidden states")
        if self.kept is not None:  # signed by both ends: a fraud proof's parts
            self.kept.append((request.SerializeToString(), reply.SerializeToString()))
        return reply

    async def _own_exchange(self, request: pb.Step, timeout: float | None) -> pb.StepResult:
        """A step on the session's own Inference stream, its reply checked to be the node's answer to it."""
        node, address = self.node, self.node.address
        try:
            call = self.call
            if call is None:
                stub = await node.stub(timeout)
                await node.audience(timeout)
                call = self.call = stub.Inference()
            async with asyncio.timeout(timeout):  # one timer for the exchange; wait_for would make two tasks
                await call.write(node.sign("Inference", request))
                reply = await call.read()
        except asyncio.InvalidStateError:  # the stream already ended: the node closed it or died
            raise NodeError(address, *await self._ended()) from None
        except TimeoutError:
            self.abort()
            raise NodeError(address, f"no reply within {timeout}s", grpc.StatusCode.DEADLINE_EXCEEDED.name) from None
        if reply is aio.EOF:
            raise NodeError(address, *await self._ended())
        node.check("Inference", reply, request)
        return reply

    def _hidden(self, reply: pb.StepResult) -> torch.Tensor:
        try:
            return tensor_codec.decode(reply.hidden)
        except tensor_codec.TensorFormatError as e:
            raise NodeError(self.node.address, f"malformed hidden states in reply: {e}") from None

    async def _ended(self) -> tuple[str, str]:
        """(message, status name) of the stream the node ended."""
        if self.call is None:
            return "stream ended", "UNKNOWN"
        code = await self.call.code()
        return f"stream ended: {code} {await self.call.details() or ''}".strip(), code.name

    def abort(self) -> None:
        if self.batched is not None:
            self.node.step_batcher.close_session(self.spec.session_id, self.batched)
        if self.call is not None:
            self.call.cancel()

    async def close(self) -> None:
        if self.batched is not None:
            self.node.step_batcher.close_session(self.spec.session_id, self.batched)
        if self.call is not None and not self.call.done():
            await self.call.done_writing()
