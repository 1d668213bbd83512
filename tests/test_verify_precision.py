"""Unit tier: --verify in a swarm of mixed precisions (client/precision.py), over in-memory nodes running the real
span backend (tests/helpers/memory_node.py) with float32 or int8 weights. Honest nodes of any precision are never
accused; an int8 liar is judged by int8 weights (another node's or the client's own) and caught; `fp32_only`
routes around every node that is not the exact float32 model."""

from __future__ import annotations

import logging

import pytest
import torch
from dishonest_node import dishonest_memory_node
from greedy import new_greedy_tokens
from memory_node import MemoryNode, MemoryPeers

from torchnode.client.model import AsyncDistributedModel
from torchnode.client.precision import EXACT, Precision, tolerance
from torchnode.client.routing import NoRouteError
from torchnode.client.sampling import SamplingParams
from torchnode.client.session import RetryPolicy

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300, 12]])
NEW = 16
WINDOW = 8
RUNS = 6  # generations per mixed swarm: routing draws anew each time
FAST_RETRY = RetryPolicy(max_attempts=3, max_seconds=5.0, backoff_initial=0.01, backoff_max=0.05)


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    return new_greedy_tokens(tiny_llama, PROMPT, NEW)


@pytest.fixture
def nodes():
    made = []
    yield made
    for node in made:
        node.shutdown()


HONEST_SPEED = 5.0  # tokens/s honest nodes announce: slow enough that a probe's RTT on a busy machine never
# outweighs it, so routing's choice between nodes 1000x apart in speed is certain


def node(nodes, ckpt, start, end, address, quant="none", throughput=HONEST_SPEED, lies=None) -> MemoryNode:
    made = (
        dishonest_memory_node(ckpt, start, end, address, lies, quant=quant)
        if lies
        else MemoryNode(ckpt, start, end, address, quant=quant)
    )
    made.backend.throughput = throughput
    nodes.append(made)
    return made


def client(ckpt, nodes, **kwargs) -> AsyncDistributedModel:
    kwargs = {"verify": True, "verify_window": WINDOW, **kwargs}
    return AsyncDistributedModel(ckpt, MemoryPeers(nodes), step_timeout=5.0, retry=FAST_RETRY, **kwargs)


async def generate(model: AsyncDistributedModel) -> list[int]:
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    return [int(t[0]) async for t in model.generate_ids(PROMPT, params)]


def accused(caplog) -> list[str]:
    return [r.message for r in caplog.records if "dishonest" in r.message]


def test_only_the_same_weights_compare_and_dtypes_loosen_the_tolerance():
    int8 = Precision("float32", "int8")
    assert tolerance(int8, EXACT) is None and tolerance(Precision("bfloat16", "int4"), int8) is None
    assert tolerance(EXACT, EXACT) < tolerance(Precision("float16"), EXACT) < tolerance(Precision("bfloat16"), EXACT)
    assert tolerance(int8, int8) == tolerance(Precision("bfloat16"), EXACT)  # its kernels round inputs to bf16
    assert EXACT.exact and not int8.exact and not Precision("bfloat16").exact


@pytest.mark.parametrize("int8_speed", [10_000.0, 1.0], ids=["int8-in-the-chain", "int8-as-a-checker"])
@pytest.mark.parametrize("local", [True, False], ids=["local-weights", "no-local-weights"])
async def test_an_honest_int8_node_among_fp32_replicas_is_never_accused(
    ckpt, nodes, expected, caplog, int8_speed, local
):
    """The swarm of issue 24: fp32 nodes of both spans beside an honest int8 node of the first. Routed into the
    main chain, it is judged in int8; slow, it is the only other node of its blocks, and once was asked to judge
    the float32 node there (and called a liar for the difference): now it never is."""
    node(nodes, ckpt, 0, 2, "fp32-a:1")
    node(nodes, ckpt, 2, 4, "fp32-b:1")
    node(nodes, ckpt, 2, 4, "fp32-b:2")
    int8 = node(nodes, ckpt, 0, 2, "int8-a:1", "int8", int8_speed)
    if not local:  # without the client's weights, only nodes of like precision can judge
        node(nodes, ckpt, 0, 2, "fp32-a:2", throughput=0.5)
        node(nodes, ckpt, 0, 2, "int8-a:2", "int8", int8_speed)
    with caplog.at_level(logging.WARNING):
        for _ in range(RUNS):
            model = client(ckpt, nodes, verify_local=local)
            out = await generate(model)
            assert not model.dishonest, accused(caplog)
            if int8_speed < HONEST_SPEED:  # not in the main chain: the float32 model's own answer
                assert out == expected
    assert not accused(caplog)
    assert (int8.steps_served > 0) == (int8_speed > HONEST_SPEED)  # in the chain, or never a float32 node's judge


@pytest.mark.parametrize("local", [True, False], ids=["judged-by-local-int8", "judged-by-int8-nodes"])
async def test_a_lying_int8_node_is_caught_and_the_answer_is_the_honest_int8_chains(ckpt, nodes, caplog, local):
    node(nodes, ckpt, 0, 2, "int8-a:1", "int8")
    node(nodes, ckpt, 2, 4, "fp32-b:1")
    if not local:
        node(nodes, ckpt, 0, 2, "int8-a:2", "int8", throughput=0.5)
        node(nodes, ckpt, 2, 4, "fp32-b:2", throughput=0.5)
    node(nodes, ckpt, 0, 2, "fp32-a:1", throughput=0.1)  # a float32 replica: never its judge
    reference = await generate(client(ckpt, nodes, verify=False, fp32_only=False))
    nodes[-1].backend.throughput = 0.001  # keep the honest chain int8 + fp32 as the reference's was
    liar = node(nodes, ckpt, 0, 2, "int8-liar:1", "int8", 10_000.0, lies="decode")
    model = client(ckpt, nodes, verify_local=local)
    with caplog.at_level(logging.WARNING):
        assert await generate(model) == reference
    assert liar.backend.lies and model.dishonest == {liar.address}
    assert all(liar.address in line for line in accused(caplog)), accused(caplog)
    assert "nan" not in " ".join(accused(caplog))


async def test_fp32_only_routes_around_quantized_and_bf16_nodes(ckpt, nodes, expected):
    int8 = node(nodes, ckpt, 0, 2, "int8-a:1", "int8", 10_000.0)
    fast = MemoryNode(ckpt, 2, 4, "bf16-b:1", dtype=torch.bfloat16)
    fast.backend.throughput = 10_000.0
    nodes.append(fast)
    node(nodes, ckpt, 0, 2, "fp32-a:1")
    node(nodes, ckpt, 2, 4, "fp32-b:1")
    assert await generate(client(ckpt, nodes, verify=False, fp32_only=True)) == expected
    assert int8.steps_served == fast.steps_served == 0
    nodes[2].down = True
    with pytest.raises(NoRouteError, match="0:2 .*float32"):
        await generate(client(ckpt, nodes, verify=False, fp32_only=True))
