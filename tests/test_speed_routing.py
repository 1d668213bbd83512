"""Unit tier: a long-lived client stops routing through a node that announces 100x its speed and serves
slowly (in-memory nodes with the real span backend; the slow one sleeps before every step): it is left
mid-session once measured, and later sessions route around it; the output stays token-exact."""

from __future__ import annotations

import pytest
import torch
from greedy import new_greedy_tokens
from memory_node import MemoryNode, MemoryPeers

from torchnode.client.model import AsyncDistributedModel
from torchnode.client.sampling import SamplingParams
from torchnode.client.speed_book import SpeedPolicy

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300, 12]])
NEW = 8
SLOW_STEP_S = 0.1


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    return new_greedy_tokens(tiny_llama, PROMPT, NEW)


@pytest.fixture
def swarm(ckpt):
    """A slow liar serving 0:4 and claiming 100x an honest node's figure, beside an honest chain 0:2 + 2:4."""
    liar = MemoryNode(ckpt, 0, 4, "liar:1", throughput=10_000.0)
    liar.step_delay = SLOW_STEP_S
    nodes = [liar, MemoryNode(ckpt, 0, 2, "a:1"), MemoryNode(ckpt, 2, 4, "b:1")]
    yield nodes
    for node in nodes:
        node.shutdown()


async def generation(model: AsyncDistributedModel, push: bool) -> tuple[list[int], list[list[str]], int]:
    """Tokens, the session's route at its start and at its end, and how often it re-routed for speed."""
    session = await model.open_session(PROMPT.shape[1] + NEW)
    session.push = push
    first = [h.node.address for h in session.hops]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    try:
        tokens = [int(t[0]) async for t in model.generate_ids(PROMPT, params, session)]
    finally:
        await session.close()
    return tokens, [first, [h.node.address for h in session.hops]], session.reroutes


@pytest.mark.parametrize("push", [False, True])
async def test_a_slow_liar_is_left_mid_session_and_then_avoided(ckpt, swarm, expected, push):
    model = AsyncDistributedModel(ckpt, MemoryPeers(swarm), step_timeout=5.0)
    tokens, (start, end), reroutes = await generation(model, push)
    assert tokens == expected
    assert start == ["liar:1"]  # nothing measured yet: the claim wins the first route
    assert end == ["a:1", "b:1"] and reroutes == 1  # left after its first timed steps, history replayed
    for _ in range(3):
        tokens, routes, reroutes = await generation(model, push)
        assert tokens == expected
        assert routes == [["a:1", "b:1"]] * 2 and reroutes == 0


async def test_without_measuring_the_liar_keeps_the_traffic(ckpt, swarm, expected):
    model = AsyncDistributedModel(ckpt, MemoryPeers(swarm), step_timeout=5.0, speed=SpeedPolicy(measure=False))
    for _ in range(2):
        tokens, routes, _ = await generation(model, push=False)
        assert tokens == expected and routes == [["liar:1"]] * 2
