"""Bad requests get a gRPC status with a clear message, and the node keeps serving good ones."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from grpc import aio
from swarm import start_node

from torchnode.protocol.wire import signing, tensor_codec, tls
from torchnode.protocol.wire import torchnode_pb2 as pb
from torchnode.protocol.wire import torchnode_pb2_grpc as pb_grpc
from torchnode.protocol.wire.grpc_node import GrpcNodeClient as NodeClient
from torchnode.protocol.wire.identity import Identity
from torchnode.protocol.wire.node_client import NodeError

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

HIDDEN = 64  # tiny llama


NODE = {}  # the test node's key, learned from its certificate: the audience every request names


@pytest.fixture(scope="module")
def node(tiny_llama):
    node = start_node(str(tiny_llama), "--blocks", "0:2", "--max-message-size", "1MiB", "--max-session-tokens", "64")
    NODE["key"] = asyncio.run(tls.pin(node.address)).key
    yield node
    node.stop()


def sign(identity: Identity, method: str, message, **kwargs):
    """Signed for the test node."""
    return signing.sign(identity, method, message, audience=NODE["key"], **kwargs)


async def channel_to(address: str) -> aio.Channel:
    """A TLS channel pinned to the node's certificate."""
    pin = await tls.pin(address)
    return aio.secure_channel(address, pin.credentials(), options=pin.options())


def run(coro):
    return asyncio.run(coro)


async def call_forward(address: str, request: pb.ForwardRequest):
    async with await channel_to(address) as channel:
        return await pb_grpc.NodeStub(channel).Forward(request, timeout=10)


async def call_inference(address: str, steps: list[pb.Step]):
    """Sends the steps one by one, reading each reply; returns the replies or raises AioRpcError."""
    async with await channel_to(address) as channel:
        call = pb_grpc.NodeStub(channel).Inference()
        replies = []
        for step in steps:
            await call.write(step)
            reply = await call.read()
            if reply is aio.EOF:
                break
            replies.append(reply)
        await call.done_writing()
        if await call.code() != grpc.StatusCode.OK:
            raise aio.AioRpcError(await call.code(), None, None, await call.details())
        return replies


def good_forward(identity: Identity, x: torch.Tensor | None = None) -> pb.ForwardRequest:
    x = torch.randn(1, 3, HIDDEN) if x is None else x
    return sign(identity, "Forward", pb.ForwardRequest(hidden=tensor_codec.encode(x), start_block=0, end_block=2))


def expect_status(code: grpc.StatusCode, words: str, coro) -> None:
    with pytest.raises(aio.AioRpcError) as info:
        run(coro)
    assert info.value.code() == code, info.value.details()
    assert words.lower() in (info.value.details() or "").lower()


def assert_still_serving(node) -> None:
    reply = run(call_forward(node.address, good_forward(Identity.generate())))
    assert list(reply.hidden.shape) == [1, 3, HIDDEN]


def test_good_request_works(node):
    assert_still_serving(node)


def tensor(data: bytes, shape, dtype="float32") -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data)


BAD_FORWARDS = {
    "wrong hidden size": (lambda: tensor_codec.encode(torch.randn(1, 3, HIDDEN + 1)), "shape"),
    "unsupported dtype": (lambda: tensor(b"\0" * 3 * HIDDEN, (1, 3, HIDDEN), "int8"), "unsupported dtype"),
    "dtype/bytes mismatch": (lambda: tensor(b"\0" * 3 * HIDDEN * 2, (1, 3, HIDDEN), "float32"), "needs"),
    "truncated tensor": (lambda: tensor(b"\0" * 10, (1, 3, HIDDEN)), "needs"),
    "negative dimension": (lambda: tensor(b"", (1, -3, HIDDEN)), "negative"),
    "NaN": (lambda: tensor_codec.encode(torch.full((1, 2, HIDDEN), float("nan"))), "nan"),
    "inf": (lambda: tensor_codec.encode(torch.full((1, 2, HIDDEN), float("inf"))), "infinity"),
    "too many tokens": (lambda: tensor_codec.encode(torch.zeros(1, 65, HIDDEN)), "tokens in one request"),
}


@pytest.mark.parametrize("case", sorted(BAD_FORWARDS))
def test_bad_tensor_is_rejected(node, case):
    make, words = BAD_FORWARDS[case]
    request = pb.ForwardRequest(hidden=make(), start_block=0, end_block=2)
    sign(Identity.generate(), "Forward", request)
    code = grpc.StatusCode.OUT_OF_RANGE if case == "too many tokens" else grpc.StatusCode.INVALID_ARGUMENT
    expect_status(code, words, call_forward(node.address, request))
    assert_still_serving(node)


def test_span_not_served(node):
    request = pb.ForwardRequest(hidden=tensor_codec.encode(torch.randn(1, 1, HIDDEN)), start_block=1, end_block=3)
    expect_status(
        grpc.StatusCode.NOT_FOUND,
        "not served here",
        call_forward(node.address, sign(Identity.generate(), "Forward", request)),
    )
    assert_still_serving(node)


def test_oversized_message(node):
    x = torch.randn(1, 40, 8192)  # 1.3 MB > --max-message-size 1MiB
    request = sign(
        Identity.generate(), "Forward", pb.ForwardRequest(hidden=tensor_codec.encode(x), start_block=0, end_block=2)
    )
    expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max", call_forward(node.address, request))
    assert_still_serving(node)


def test_unsigned_request(node):
    request = pb.ForwardRequest(hidden=tensor_codec.encode(torch.randn(1, 1, HIDDEN)), start_block=0, end_block=2)
    expect_status(grpc.StatusCode.UNAUTHENTICATED, "unsigned", call_forward(node.address, request))
    assert_still_serving(node)


def test_forged_signature(node):
    request = good_forward(Identity.generate())
    request.auth.public_key = Identity.generate().public_key  # claims to be somebody else
    expect_status(grpc.StatusCode.UNAUTHENTICATED, "bad signature", call_forward(node.address, request))
    assert_still_serving(node)


def test_tampered_request(node):
    request = good_forward(Identity.generate())
    request.end_block = 1  # changed after signing
    expect_status(grpc.StatusCode.UNAUTHENTICATED, "bad signature", call_forward(node.address, request))
    assert_still_serving(node)


def test_stale_signature(node):
    identity = Identity.generate()
    request = pb.ForwardRequest(hidden=tensor_codec.encode(torch.randn(1, 1, HIDDEN)), start_block=0, end_block=2)
    old = 1_000_000_000.0  # 2001: far outside the clock-skew window, and correctly signed
    nonce = b"n" * 16
    sign(identity, "Forward", request, timestamp=old, nonce=nonce)
    expect_status(grpc.StatusCode.UNAUTHENTICATED, "stale", call_forward(node.address, request))
    assert_still_serving(node)


def test_replayed_request(node):
    request = good_forward(Identity.generate())
    run(call_forward(node.address, request))
    expect_status(grpc.StatusCode.UNAUTHENTICATED, "replayed", call_forward(node.address, request))
    assert_still_serving(node)


def step(identity: Identity, index: int, x: torch.Tensor | None = None, session: str = "s1", **fields) -> pb.Step:
    message = pb.Step(session_id=session, step=index, **fields)
    if x is not None:
        message.hidden.CopyFrom(tensor_codec.encode(x))
    return sign(identity, "Inference", message)


def test_session_roundtrip_and_stepping_errors(node):
    me = Identity.generate()
    opened = dict(max_length=16, start_block=0, end_block=2, batch_size=1)
    replies = run(
        call_inference(
            node.address,
            [step(me, 0, torch.randn(1, 4, HIDDEN), **opened), step(me, 1, torch.randn(1, 1, HIDDEN), position=4)],
        )
    )
    assert [r.cached_length for r in replies] == [4, 5]

    cases = [
        ([step(me, 3, torch.randn(1, 1, HIDDEN), session="nope")], grpc.StatusCode.NOT_FOUND, "unknown session"),
        (
            [step(me, 0, None, session="a", **opened), step(me, 1, torch.randn(1, 1, HIDDEN), session="b")],
            grpc.StatusCode.NOT_FOUND,
            "unknown session",
        ),
        (
            [step(me, 0, None, session="c", **opened), step(me, 2, torch.randn(1, 1, HIDDEN), session="c")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "out of order",
        ),
        (
            [step(me, 0, torch.randn(1, 2, HIDDEN), session="d", position=5, **opened)],
            grpc.StatusCode.OUT_OF_RANGE,
            "past the",
        ),
        ([step(me, 0, torch.randn(1, 17, HIDDEN), session="e", **opened)], grpc.StatusCode.OUT_OF_RANGE, "max_length"),
        (
            [step(me, 0, None, session="f", max_length=100000, start_block=0, end_block=2)],
            grpc.StatusCode.OUT_OF_RANGE,
            "--max-session-tokens",
        ),
        (
            [step(me, 0, None, session="g", max_length=8, start_block=0, end_block=5)],
            grpc.StatusCode.NOT_FOUND,
            "not served",
        ),
        (
            [step(me, 0, torch.randn(2, 1, HIDDEN), session="h", **opened)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "batch size",
        ),
    ]
    for steps, code, words in cases:
        expect_status(code, words, call_inference(node.address, steps))
    assert_still_serving(node)


def test_client_rejects_reply_signed_by_another_key(node):
    async def info_with_wrong_pin():
        client = NodeClient(node.address, Identity.generate(), expected_key=Identity.generate().public_key)
        try:
            await client.info()
        finally:
            await client.close()

    with pytest.raises(NodeError, match="not bound to the expected key"):
        run(info_with_wrong_pin())


def test_pinned_key_is_accepted(node):
    async def info_twice():
        client = NodeClient(node.address, Identity.generate())
        try:
            first = await client.info()
            assert client.expected_key == first.public_key
            return await client.info()
        finally:
            await client.close()

    assert run(info_twice()).start_block == 0
