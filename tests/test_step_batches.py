"""StepBatches: a client's sessions on a node share one stream, one signed message per round (protocol 1.1).

Against a real node process (the tiny llama, blocks 0:4): batched sessions give the outputs their own
Inference streams give, in fewer messages; a failing step fails its own session only; closed sessions are
freed on the node; a node of protocol 1.0 gets a stream per session; an unsigned batch is refused."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from grpc import aio

from torchnode.protocol.wire import torchnode_pb2 as pb
from torchnode.protocol.wire.grpc_node import GrpcNodeClient
from torchnode.protocol.wire.identity import Identity
from torchnode.protocol.wire.node_client import NodeError, SessionSpec

pytestmark = pytest.mark.swarm
HIDDEN, TIMEOUT = 64, 30.0


@pytest.fixture(scope="module")
def node(tiny_llama):
    from swarm import start_node

    process = start_node(str(tiny_llama), "--blocks", "0:4")
    yield process
    process.stop()


async def connected(node) -> GrpcNodeClient:
    client = GrpcNodeClient(node.address, Identity.generate())
    await client.info()  # what the client knows of a node before routing through it: its protocol too
    return client


def inputs(sessions: int, steps: int) -> list[list[torch.Tensor]]:
    """Per session: a prompt of its own length, then one-token steps."""
    gen = torch.Generator().manual_seed(0)
    return [
        [torch.randn(1, 3 + s if i == 0 else 1, HIDDEN, generator=gen) for i in range(steps)] for s in range(sessions)
    ]


async def run_sessions(client: GrpcNodeClient, batched: bool, xs: list[list[torch.Tensor]], tag: str):
    """Every session's steps, all sessions at once each round; (outputs per session, the sessions)."""
    sessions = [
        client.open_session(SessionSpec(f"{tag}{i}", 0, 4, max_length=32, batched=batched)) for i in range(len(xs))
    ]
    outs: list[list[torch.Tensor]] = [[] for _ in xs]
    positions = [0] * len(xs)
    for step in range(len(xs[0])):
        got = await asyncio.gather(
            *(s.step(x[step], positions[i], TIMEOUT) for i, (s, x) in enumerate(zip(sessions, xs, strict=True)))
        )
        for i, out in enumerate(got):
            outs[i].append(out)
            positions[i] += xs[i][step].shape[1]
    return outs, sessions


def test_batched_sessions_equal_their_own_streams_in_fewer_messages(node):
    async def main():
        client = await connected(node)
        try:
            assert client.batches_steps
            xs = inputs(sessions=4, steps=4)
            alone, own = await run_sessions(client, False, xs, "own")
            together, shared = await run_sessions(client, True, xs, "shared")
            assert [s.batched for s in own] == [None] * 4  # an Inference stream each
            assert [s.batched for s in shared] == [client.step_batcher.epoch] * 4  # one StepBatches stream
            for a, b in zip(alone, together, strict=True):
                for x, y in zip(a, b, strict=True):
                    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
            assert client.step_batcher.batches_sent <= 2 * 4  # 16 steps; a round's steps leave together
            for s in own + shared:
                await s.close()
        finally:
            await client.close()

    asyncio.run(main())


def test_a_failing_step_fails_its_own_session_only(node):
    async def main():
        client = await connected(node)
        try:
            xs = inputs(sessions=3, steps=1)
            _, (a, b, c) = await run_sessions(client, True, xs, "fail")
            x = torch.randn(1, 1, HIDDEN)
            results = await asyncio.gather(
                a.step(x, 3, TIMEOUT), b.step(x, 99, TIMEOUT), c.step(x, 5, TIMEOUT), return_exceptions=True
            )
            assert isinstance(results[1], NodeError) and results[1].status == "OUT_OF_RANGE", results[1]
            assert "past the 4 cached tokens" in str(results[1])
            assert all(isinstance(r, torch.Tensor) for r in (results[0], results[2])), results
            more = await asyncio.gather(a.step(x, 4, TIMEOUT), c.step(x, 6, TIMEOUT))  # the others carry on
            assert [m.shape for m in more] == [(1, 1, HIDDEN)] * 2
            with pytest.raises(NodeError, match="unknown session|closed"):  # the failed one is gone on the node
                await b.step(x, 4, TIMEOUT)
        finally:
            await client.close()

    asyncio.run(main())


def test_closed_sessions_are_freed_on_the_node(node):
    async def main():
        client = await connected(node)
        try:
            free = (await client.info()).sessions_free
            _, sessions = await run_sessions(client, True, inputs(sessions=3, steps=2), "free")
            assert (await client.info()).sessions_free == free - 3
            for s in sessions:
                await s.close()
            deadline = time.monotonic() + 10
            while (await client.info()).sessions_free != free:
                assert time.monotonic() < deadline, "closed sessions still held by the node"
                await asyncio.sleep(0.05)
        finally:
            await client.close()

    asyncio.run(main())


def test_a_node_of_protocol_1_0_gets_a_stream_per_session(node):
    async def main():
        client = await connected(node)
        client.protocol = "1.0"  # as a node before StepBatches answers Info
        try:
            outs, sessions = await run_sessions(client, True, inputs(sessions=2, steps=2), "old")
            assert [s.batched for s in sessions] == [None, None] and client.step_batcher.batches_sent == 0
            assert all(o.shape[-1] == HIDDEN for per in outs for o in per)
        finally:
            await client.close()

    asyncio.run(main())


def test_an_unsigned_batch_is_refused(node):
    async def main():
        client = await connected(node)
        try:
            call = (await client.stub()).StepBatches()
            await call.write(pb.StepBatch(steps=[pb.Step(session_id="x", step=0, max_length=8, end_block=4)]))
            with pytest.raises(aio.AioRpcError) as refused:
                await call.read()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "unsigned StepBatches message" in refused.value.details()
        finally:
            await client.close()

    asyncio.run(main())


def test_a_flood_of_steps_in_one_message_ends_the_stream(node):
    """More steps on one stream than twice --max-sessions (a session has one in flight at a time, and its
    answer on the way back) is not a client's batch but a flood of tasks: the node ends the stream with
    RESOURCE_EXHAUSTED, naming the limit."""

    async def main():
        client = await connected(node)
        try:
            call = (await client.stub()).StepBatches()
            steps = [pb.Step(session_id=f"f{i}", step=0, max_length=8, end_block=4) for i in range(129)]
            await call.write(client.sign("StepBatches", pb.StepBatch(steps=steps)))
            with pytest.raises(aio.AioRpcError) as refused:
                await call.read()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at most 128, twice --max-sessions" in refused.value.details()
            assert (await client.info()).sessions_free == 64  # nothing was opened
        finally:
            await client.close()

    asyncio.run(main())


def test_idle_sessions_are_freed_and_an_idle_stream_ends(tiny_llama):
    """--session-timeout holds on a shared stream too: a session idle past it is freed (its next step is
    refused, naming why), and the stream, once nothing is open on it, ends; the next session opens a new one."""
    from swarm import start_node

    node = start_node(str(tiny_llama), "--blocks", "0:4", "--session-timeout", "1")

    async def main():
        client = await connected(node)
        try:
            free = (await client.info()).sessions_free
            _, (a, b) = await run_sessions(client, True, inputs(sessions=2, steps=1), "idle")
            epoch = client.step_batcher.epoch
            deadline = time.monotonic() + 10
            while (await client.info()).sessions_free != free:  # both idle past 1 s: freed
                assert time.monotonic() < deadline, "idle sessions still held by the node"
                await asyncio.sleep(0.1)
            with pytest.raises(NodeError, match="idle past --session-timeout|stream this session was opened on ended"):
                await a.step(torch.randn(1, 1, HIDDEN), 3, TIMEOUT)
            while client.step_batcher.epoch == epoch:  # the empty stream ends after another second
                assert time.monotonic() < deadline, "an idle stream with nothing open was kept"
                await asyncio.sleep(0.1)
            outs, (c,) = await run_sessions(client, True, inputs(sessions=1, steps=2), "after")
            assert c.batched == client.step_batcher.epoch and outs[0][1].shape == (1, 1, HIDDEN)
        finally:
            await client.close()

    try:
        asyncio.run(main())
    finally:
        node.stop()


def test_sessions_routed_through_the_dht_share_each_nodes_stream(tiny_llama):
    """Routing probes every node it finds (Info tells its protocol), so sessions of a swarm found through the
    DHT step on each node's shared stream, and their tokens are still transformers' own."""
    from greedy import hf_greedy
    from swarm import start_coordinator, start_node, stop_all
    from transformers import AutoModelForCausalLM

    from torchnode.client.sampling import SamplingParams
    from torchnode.client.sync_model import DistributedModel

    coordinator, maddr = start_coordinator()
    nodes = [start_node(str(tiny_llama), "--initial-peers", maddr, "--blocks", span) for span in ("0:2", "2:4")]
    try:
        ids = torch.tensor([[1, 5, 9, 14]])
        hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        expected = hf_greedy(hf, ids, 8)[0, ids.shape[1] :].tolist()
        with DistributedModel.from_pretrained(str(tiny_llama), initial_peers=[maddr]) as model:
            core = model.async_model
            sessions = [model.run(core.open_session(16)) for _ in range(2)]
            for session in sessions:
                params = SamplingParams(max_new_tokens=8)
                assert [int(t[0]) for t in model.iterate(core.generate_ids(ids, params, session))] == expected
            hops = [hop for session in sessions for hop in session.hops]
            assert [h.end - h.start for h in hops] == [2, 2, 2, 2]
            assert all(h.stream.batched == h.node.step_batcher.epoch for h in hops)  # the shared stream
            assert {h.node.step_batcher.batches_sent > 0 for h in hops} == {True}
            for session in sessions:
                model.run(session.close())
    finally:
        stop_all(nodes)
        coordinator.stop()
