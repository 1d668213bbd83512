"""Over 1,000 malformed requests at one live node: each gets an error status with a message, none hangs,
and afterwards a good session still computes exactly what it computed before."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from swarm import start_node

from torchnode.protocol.wire import signing, tensor_codec, tls
from torchnode.protocol.wire import torchnode_pb2 as pb
from torchnode.protocol.wire import torchnode_pb2_grpc as pb_grpc
from torchnode.protocol.wire.identity import Identity

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

HIDDEN = 64
TIMEOUT = 5.0
SENT = {"requests": 0}
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
ME = Identity.generate()


@pytest.fixture(scope="module")
def node(tiny_llama):
    node = start_node(str(tiny_llama), "--blocks", "0:2", "--max-message-size", "1MiB", "--max-session-tokens", "64")
    yield node
    node.stop()


NODE = {}  # the node's key, learned from its certificate: the audience every request names


def sign(identity: Identity, method: str, message, **kwargs):
    """Signed for the test node."""
    return signing.sign(identity, method, message, audience=NODE["key"], **kwargs)


@pytest.fixture(scope="module")
def channel(node):
    pin = asyncio.run(tls.pin(node.address))
    NODE["key"] = pin.key
    with grpc.secure_channel(node.address, pin.credentials(), options=pin.options()) as channel:
        yield channel


@pytest.fixture(scope="module")
def good_before(channel):
    return good_session(channel)


def good_session(channel) -> torch.Tensor:
    x = torch.arange(5 * HIDDEN, dtype=torch.float32).reshape(1, 5, HIDDEN).sin()
    steps = [
        step(0, x[:, :3], session=f"good-{time.time_ns()}", max_length=16, start_block=0, end_block=2, batch_size=1)
    ]
    steps += [step(i + 1, x[:, 3 + i : 4 + i], session=steps[0].session_id, position=3 + i) for i in range(2)]
    replies = list(pb_grpc.NodeStub(channel).Inference(iter(steps), timeout=TIMEOUT))
    return torch.cat([tensor_codec.decode(r.hidden) for r in replies], dim=1)


def step(index: int, x: torch.Tensor | None = None, session: str = "fuzz", **fields) -> pb.Step:
    message = pb.Step(session_id=session, step=index, **fields)
    if x is not None:
        message.hidden.CopyFrom(tensor_codec.encode(x))
    return sign(ME, "Inference", message)


def expect_error(call) -> grpc.RpcError:
    SENT["requests"] += 1
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert error.code() != grpc.StatusCode.OK
    assert error.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the node hung"
    assert error.details(), f"{error.code()} without a message"
    return error


# ---- raw bytes straight into the deserializer
@SETTINGS
@given(body=st.binary(max_size=512), method=st.sampled_from(["Forward", "Info"]))
def test_random_bytes(channel, good_before, body, method):  # good_before: recorded before any fuzzing
    call = channel.unary_unary(f"/torchnode.Node/{method}", request_serializer=None, response_deserializer=None)
    SENT["requests"] += 1
    try:
        call(body, timeout=TIMEOUT)
    except grpc.RpcError as error:
        assert error.code() != grpc.StatusCode.DEADLINE_EXCEEDED and error.details()
    else:
        pytest.fail("random bytes were served")  # unsigned at best: must be refused


# ---- one corruption of an otherwise good, signed Forward
dims = st.integers(min_value=-(2**40), max_value=2**40)
CORRUPTIONS = st.one_of(
    st.tuples(st.just("hidden_size"), st.integers(1, 200).filter(lambda h: h != HIDDEN)),
    st.tuples(st.just("dtype"), st.text(max_size=12).filter(lambda d: d not in tensor_codec.WIRE_DTYPES)),
    st.tuples(st.just("truncate"), st.integers(1, 3 * HIDDEN * 4 - 1)),
    st.tuples(st.just("shape"), st.lists(dims, min_size=0, max_size=6)),
    st.tuples(st.just("nonfinite"), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.tuples(
        st.just("span"), st.tuples(st.integers(-5, 10), st.integers(-5, 10)).filter(lambda s: not 0 <= s[0] < s[1] <= 2)
    ),
    st.tuples(st.just("tokens"), st.integers(65, 200)),
    st.tuples(
        st.just("wire_dtype"), st.text(min_size=1, max_size=12).filter(lambda d: d not in tensor_codec.WIRE_DTYPES)
    ),
    st.tuples(st.just("stale"), st.sampled_from([-1, 1]).map(lambda sign: sign * 3600.0)),
    st.tuples(st.just("nonce"), st.binary(max_size=40).filter(lambda n: len(n) != signing.NONCE_BYTES)),
    st.tuples(st.just("foreign_key"), st.just(None)),
    st.tuples(st.just("replay"), st.just(None)),
)


def corrupt(kind: str, value) -> pb.ForwardRequest:
    x = torch.randn(1, 3, HIDDEN)
    request = pb.ForwardRequest(hidden=tensor_codec.encode(x), start_block=0, end_block=2)
    if kind == "hidden_size":
        request.hidden.CopyFrom(tensor_codec.encode(torch.randn(1, 3, value)))
    elif kind == "dtype":
        request.hidden.dtype = value
    elif kind == "truncate":
        request.hidden.data = request.hidden.data[:value]
    elif kind == "shape":
        del request.hidden.shape[:]
        request.hidden.shape.extend(value if value != [1, 3, HIDDEN] else [3, 1, HIDDEN, 1])
    elif kind == "nonfinite":
        x[0, 1, 5] = value
        request.hidden.CopyFrom(tensor_codec.encode(x))
    elif kind == "span":
        request.start_block, request.end_block = value
    elif kind == "tokens":
        request.hidden.CopyFrom(tensor_codec.encode(torch.randn(1, value, HIDDEN)))
    elif kind == "wire_dtype":
        request.wire_dtype = value
    sign(ME, "Forward", request)
    if kind == "stale":
        sign(ME, "Forward", request, timestamp=request.auth.timestamp + value)
    elif kind == "nonce":
        sign(ME, "Forward", request, timestamp=request.auth.timestamp, nonce=value)
    elif kind == "foreign_key":
        request.auth.public_key = Identity.generate().public_key
    return request


@SETTINGS
@given(corruption=CORRUPTIONS)
def test_corrupted_forward(channel, corruption):
    kind, value = corruption
    request = corrupt(kind, value)
    stub = pb_grpc.NodeStub(channel)
    if kind == "replay":
        stub.Forward(request, timeout=TIMEOUT)  # the first use is fine
    expect_error(lambda: stub.Forward(request, timeout=TIMEOUT))


# ---- sessions: bad opening, bad positions, wrong order, unknown sessions
STEP_CASES = st.one_of(
    st.builds(lambda n: [step(n, torch.randn(1, 1, HIDDEN))], st.integers(1, 2**40)),  # unknown session
    st.builds(
        lambda m: [step(0, None, max_length=m, start_block=0, end_block=2, batch_size=1)],
        st.integers(-(2**31), 0) | st.integers(65, 2**31 - 1),
    ),
    st.builds(
        lambda b: [step(0, None, max_length=8, start_block=0, end_block=2, batch_size=b)],
        st.integers(-(2**31), -1) | st.integers(1025, 2**31 - 1),
    ),  # 0 = unset = 1
    st.builds(
        lambda p: [
            step(0, torch.randn(1, 1, HIDDEN), max_length=8, start_block=0, end_block=2, batch_size=1, position=p)
        ],
        st.integers(-(2**62), -1) | st.integers(1, 2**62),
    ),
    st.builds(
        lambda j: [
            step(0, None, max_length=8, start_block=0, end_block=2, batch_size=1),
            step(j, torch.randn(1, 1, HIDDEN)),
        ],
        st.integers(-(2**40), 2**40).filter(lambda j: j != 1),
    ),
    st.builds(
        lambda s: [
            step(0, None, max_length=8, start_block=0, end_block=2, batch_size=1),
            step(1, torch.randn(1, 1, HIDDEN), session=s),
        ],
        st.text(min_size=1, max_size=20).filter(lambda s: s != "fuzz"),
    ),
    st.builds(
        lambda n: [
            step(0, None, max_length=8, start_block=0, end_block=2, batch_size=1),
            step(1, torch.randn(1, n, HIDDEN)),
        ],
        st.integers(9, 64),
    ),
)


@SETTINGS
@given(steps=STEP_CASES)
def test_bad_session_steps(channel, steps):
    unique = f"fuzz-{time.time_ns()}"
    for message in steps:  # a fresh session id per example, re-signed
        if message.session_id == "fuzz":
            message.session_id = unique
        sign(ME, "Inference", message)
    expect_error(lambda: list(pb_grpc.NodeStub(channel).Inference(iter(steps), timeout=TIMEOUT)))


def test_node_still_serves_exactly_after_fuzzing(channel, good_before):
    assert SENT["requests"] >= 1000, SENT
    assert torch.allclose(good_session(channel), good_before, atol=1e-6)
