"""Unit tier: the client's inference session (steps, rewind, failover, replay, bans) through in-memory
nodes that run the real span backend behind the node interface. No processes, no sockets: seconds."""

from __future__ import annotations

import asyncio

import pytest
import torch
from greedy import new_greedy_tokens
from memory_node import FAST_RETRY, MemoryNode, MemoryPeers

from torchnode.client.ban_list import BanList
from torchnode.client.model import AsyncDistributedModel
from torchnode.client.routing import NoRouteError
from torchnode.client.sampling import SamplingParams

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300, 12]])
NEW = 16


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    return new_greedy_tokens(tiny_llama, PROMPT, NEW)


@pytest.fixture
def swarm(ckpt):
    """Blocks 0:2 on one node, 2:4 on two replicas; shut down after the test."""
    nodes = [MemoryNode(ckpt, 0, 2, "a:1"), MemoryNode(ckpt, 2, 4, "b:1"), MemoryNode(ckpt, 2, 4, "c:1")]
    yield nodes
    for node in nodes:
        node.shutdown()


def model_over(ckpt, nodes) -> AsyncDistributedModel:
    return AsyncDistributedModel(ckpt, MemoryPeers(nodes), step_timeout=5.0, retry=FAST_RETRY)


async def generate(model: AsyncDistributedModel, session=None, on_token=None) -> list[int]:
    tokens = []
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    async for new in model.generate_ids(PROMPT, params, session):
        tokens.append(int(new[0]))
        if on_token is not None:
            on_token(len(tokens))
    return tokens


@pytest.mark.swarm
async def test_generation_equals_transformers(ckpt, swarm, expected):
    model = model_over(ckpt, swarm)
    assert await generate(model) == expected


async def test_the_next_step_leaves_before_the_caller_takes_a_token(ckpt, swarm, expected):
    """A caller slow with each token (the SDK's sync iterator in another thread, an API server writing it out)
    does not hold the nodes up: the step feeding that token back is already on its way while the caller works."""
    model = model_over(ckpt, swarm[:2])
    first = swarm[0]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    tokens, served = [], []
    async for new in model.generate_ids(PROMPT, params):
        await asyncio.sleep(0.05)  # the caller's own work on the token
        served.append(first.steps_served)
        tokens.append(int(new[0]))
    assert tokens == expected
    # token k came from the prefill and k decode steps; the (k + 1)-th ran meanwhile; none after the last token
    assert served == [k + 2 for k in range(NEW - 1)] + [NEW]


async def test_a_caller_that_stops_early_leaves_the_session_in_step(ckpt, swarm, expected):
    """A caller that stops reading after a few tokens (a stop string, a client that left) and never closes the
    generator: the step it had sent lands before the session's next one, so the next turn goes on from where
    the caller stopped and gets the same tokens."""
    async with asyncio.timeout(60):  # steps of one session running at once used to stall the next: fail, not hang
        model = model_over(ckpt, swarm[:2])
        session = await model.open_session(PROMPT.shape[1] + NEW)
        got: list[int] = []
        async for new in model.generate_ids(PROMPT, SamplingParams(max_new_tokens=NEW), session):
            got.append(int(new[0]))
            if len(got) == 5:
                break  # no aclose: the generator is left as it is
        so_far = torch.cat([PROMPT, torch.tensor([got])], dim=1)
        cached = so_far.shape[1] - 1  # all but the newest token, as a chat session counts them
        params = SamplingParams(max_new_tokens=NEW - len(got), ignore_eos=True)
        rest = [int(new[0]) async for new in model.generate_ids(so_far, params, session, cached)]
        await session.close()
    assert got + rest == expected


@pytest.mark.swarm
async def test_empty_input_is_the_callers_error_not_a_node_failure(ckpt, swarm):
    model = model_over(ckpt, swarm)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    with pytest.raises(ValueError, match="nothing to generate from: 0 prompt tokens"):
        async for _ in model.generate_ids(PROMPT[:, :0], params):
            pass
    session = await model.open_session(PROMPT.shape[1] + NEW)
    with pytest.raises(ValueError, match=r"nothing to send: hidden states of shape \[1, 0, "):
        await session.prefill(model.heads.embed(PROMPT[:, :0]))
    assert session.reroutes == 0  # no node was blamed
    await session.close()


@pytest.mark.swarm
async def test_failover_replays_history_on_a_replica(ckpt, swarm, expected):
    model = model_over(ckpt, swarm)
    session = await model.open_session(PROMPT.shape[1] + NEW)
    victim = next(n for n in swarm if n.address == session.hops[1].node.address)
    spare = next(n for n in swarm[1:] if n is not victim)

    tokens = await generate(model, session, on_token=lambda i: victim.fail_after(0) if i == 5 else None)

    assert tokens == expected  # exactly the undisturbed output
    assert victim.address in model.bans.banned()
    replay = spare.sessions[-1]
    assert replay.positions[0] == 0 and replay.positions[1:] == list(
        range(PROMPT.shape[1] + 5, PROMPT.shape[1] + NEW - 1)
    )
    await session.close()


@pytest.mark.swarm
async def test_rewind_recomputes_from_the_position_and_trims_history(ckpt, swarm):
    model = model_over(ckpt, swarm[:2])
    x = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(1))
    session = await model.open_session(32)
    await session.step(x)
    out = await session.step(y, position=6)  # forget tokens 6..9

    fresh = await model.open_session(32)
    reference = await fresh.step(torch.cat([x[:, :6], y], dim=1))
    torch.testing.assert_close(
        out, reference[:, -2:], rtol=0, atol=1e-4
    )  # prefill vs cached steps: float32 summation order
    assert session.position == 8
    for hop in session.hops:
        assert [(p, h.shape[1]) for p, h in hop.history] == [(0, 6), (6, 2)]
    await session.close()
    await fresh.close()


@pytest.mark.swarm
async def test_failover_after_rewind_replays_only_the_kept_tokens(ckpt, swarm):
    model = model_over(ckpt, swarm)
    x = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(1))
    z = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(2))
    session = await model.open_session(32)
    await session.step(x)
    await session.step(y, position=6)
    victim = next(n for n in swarm if n.address == session.hops[1].node.address)
    victim.fail_after(0)
    out = await session.step(z)  # the replica gets 8 kept tokens replayed, then z at position 8

    fresh = await model_over(ckpt, swarm).open_session(32)
    reference = await fresh.step(torch.cat([x[:, :6], y, z], dim=1))
    torch.testing.assert_close(
        out, reference[:, -1:], rtol=0, atol=1e-4
    )  # prefill vs cached steps: float32 summation order
    await session.close()
    await fresh.close()


@pytest.mark.swarm
async def test_only_node_of_a_span_dies_then_the_error_names_its_blocks(ckpt, swarm):
    nodes = swarm[:2]
    model = model_over(ckpt, nodes)
    session = await model.open_session(PROMPT.shape[1] + NEW)
    with pytest.raises(NoRouteError, match="blocks 2:4"):
        await generate(model, session, on_token=lambda i: nodes[1].fail_after(0) if i == 3 else None)
    await session.close()


@pytest.mark.swarm
async def test_routing_skips_a_node_that_is_down(ckpt, swarm, expected):
    swarm[1].down = True
    model = model_over(ckpt, swarm)
    session = await model.open_session(PROMPT.shape[1] + NEW)
    assert [h.node.address for h in session.hops] == ["a:1", "c:1"]
    assert await generate(model, session) == expected
    assert swarm[1].steps_served == 0
    await session.close()


def test_bans_double_on_repeat_and_expire():
    bans = BanList(base=0.01)
    assert bans.ban("x") == pytest.approx(0.01)
    assert bans.ban("x") == pytest.approx(0.02)
    assert "x" in bans.banned()
    import time

    time.sleep(0.03)
    assert "x" not in bans.banned()
