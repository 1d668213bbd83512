"""Node-to-node push (node/push.py, InferenceSession._pushed): each node sends its output straight to the
next one; the client keeps every hop's copy. Unit tier with in-memory nodes (fallbacks: a node that cannot
reach the next, nodes that die, a node that pushes something else than it returns), then real `torchnode`
processes: the CLI with --push, and a node killed mid-generation."""

from __future__ import annotations

import asyncio
import signal

import pytest
import torch
from greedy import chat_ids, hf_greedy, new_greedy_tokens
from memory_node import FAST_RETRY, MemoryNode, MemoryPeers
from swarm import run_cli, start_nodes, stop_all

from torchnode.client.model import AsyncDistributedModel
from torchnode.client.sampling import SamplingParams
from torchnode.client.sync_model import DistributedModel

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300, 12]])
NEW = 16


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    return new_greedy_tokens(tiny_llama, PROMPT, NEW)


class LyingPusher(MemoryNode):
    """Returns its true output to the client but pushes a perturbed one to the next node."""

    def push_to(self, target, out):
        return super().push_to(target, out + 1.0)


async def run(ckpt, nodes, push: bool = True, push_min_rtt_ms: float = 0.0) -> tuple[list[int], object]:
    """Memory nodes answer probes in microseconds: push_min_rtt_ms=0 pushes into every hop all the same."""
    model = AsyncDistributedModel(
        ckpt, MemoryPeers(nodes), step_timeout=5.0, retry=FAST_RETRY, push=push, push_min_rtt_ms=push_min_rtt_ms
    )
    session = await model.open_session(PROMPT.shape[1] + NEW)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    tokens = [int(new[0]) async for new in model.generate_ids(PROMPT, params, session)]
    await session.close()
    for node in nodes:
        node.shutdown()
    return tokens, session


def chain(ckpt, *spans: tuple[int, int], cls=MemoryNode) -> list[MemoryNode]:
    return [(cls if i == 0 else MemoryNode)(ckpt, a, b, f"push-{i}:1") for i, (a, b) in enumerate(spans)]


async def test_push_equals_transformers_and_nodes_push(ckpt, expected):
    nodes = chain(ckpt, (0, 1), (1, 3), (3, 4))
    tokens, session = await run(ckpt, nodes)
    assert tokens == expected
    assert nodes[0].pushed == nodes[1].pushed == NEW  # one step per token after the prompt's
    assert session.node_pushes == 2 * NEW
    assert len(session.hops[1].history) == NEW  # the client kept copies


async def test_without_push_the_client_drives_every_hop(ckpt, expected):
    nodes = chain(ckpt, (0, 2), (2, 4))
    tokens, session = await run(ckpt, nodes, push=False)
    assert tokens == expected and nodes[0].pushed == 0 and session.node_pushes == 0


async def test_node_that_cannot_reach_the_next_gets_its_output_sent_on_by_the_client(ckpt, expected):
    nodes = chain(ckpt, (0, 1), (1, 3), (3, 4))
    nodes[1].unreachable.add(nodes[2].address)
    tokens, session = await run(ckpt, nodes)
    assert tokens == expected
    assert nodes[1].pushed == 0 and nodes[2].steps_served == NEW and session.node_pushes == NEW  # only 0 -> 1 pushed


@pytest.mark.parametrize("dies", [0, 1])
async def test_a_node_dying_mid_generation_with_push_fails_over(ckpt, expected, dies):
    nodes = chain(ckpt, (0, 2), (2, 4)) + [MemoryNode(ckpt, *((0, 2) if dies == 0 else (2, 4)), "push-spare:1")]
    nodes[dies].fail_after(6)
    tokens, session = await run(ckpt, nodes)
    assert tokens == expected
    assert nodes[2].steps_served > 0  # the spare took over
    assert session.node_pushes > 0


class FarNode(MemoryNode):
    """Answers probes after FAR_S: a node this client reaches over a long link."""

    async def info(self, timeout=10.0):
        await asyncio.sleep(FAR_S)
        return await super().info(timeout)


FAR_S = 0.1
THRESHOLD_MS = 30.0  # far from both: a loaded machine's in-memory probe stays well under it


async def test_push_goes_only_into_hops_whose_round_trip_is_long_enough(ckpt, expected):
    """The rule: the near hops (probe round trips in microseconds) get their input from the client, the far one
    (100 ms) by push from its predecessor; the output is the same."""
    nodes = [MemoryNode(ckpt, 0, 1, "near-0:1"), MemoryNode(ckpt, 1, 3, "near-1:1"), FarNode(ckpt, 3, 4, "far-2:1")]
    tokens, session = await run(ckpt, nodes, push_min_rtt_ms=THRESHOLD_MS)
    assert tokens == expected
    assert [h.rtt >= THRESHOLD_MS / 1000 for h in session.hops] == [False, False, True]
    assert nodes[0].pushed == 0 and nodes[1].pushed == NEW  # only 1 -> 2 was pushed
    assert session.node_pushes == NEW


async def test_push_into_no_hop_when_every_node_is_near(ckpt, expected):
    nodes = chain(ckpt, (0, 2), (2, 4))
    tokens, session = await run(ckpt, nodes, push_min_rtt_ms=THRESHOLD_MS)
    assert tokens == expected and nodes[0].pushed == 0 and session.node_pushes == 0


async def test_pushed_input_that_differs_from_the_copy_stops_push(ckpt, expected):
    nodes = chain(ckpt, (0, 2), (2, 4), cls=LyingPusher)
    tokens, session = await run(ckpt, nodes)
    assert tokens == expected  # the second hop was replayed from the client's copies
    assert session.push is False


# ---- real node processes


@pytest.fixture(scope="module")
def smol_nodes():
    nodes = start_nodes("default", ["0:15", "15:30", "15:30"])
    yield nodes
    stop_all(nodes)


def test_cli_generate_with_push_equals_transformers(smol_nodes, default_reference):
    hf, tokenizer = default_reference
    prompt = "Name three colours."
    ids = chat_ids(tokenizer, prompt)
    expected = tokenizer.decode(hf_greedy(hf, ids, 24)[0, ids.shape[1] :], skip_special_tokens=True)
    peers = ",".join(n.address for n in smol_nodes[:2])
    result = run_cli(
        "generate",
        "default",
        "--peers",
        peers,
        "--max-new-tokens",
        "24",
        "--greedy",
        "--chat",
        "--push",
        "--push-min-rtt-ms",
        "0",  # loopback: push into every hop all the same
        prompt,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.strip()


def test_node_killed_mid_generation_with_push_gives_exact_output(smol_nodes, default_reference):
    hf, tokenizer = default_reference
    ids, tokens_wanted = chat_ids(tokenizer, "Tell me about the sea."), 32
    expected = hf_greedy(hf, ids, tokens_wanted)[0, ids.shape[1] :].tolist()
    with DistributedModel.from_pretrained(
        "default", [n.address for n in smol_nodes], step_timeout=5.0, push=True, push_min_rtt_ms=0
    ) as model:
        core = model.async_model
        session = model.run(core.open_session(ids.shape[1] + tokens_wanted))
        second = session.hops[-1].node.address
        victim = next(n for n in smol_nodes if n.address == second)
        tokens = []
        params = SamplingParams(max_new_tokens=tokens_wanted, ignore_eos=True)
        for new in model.iterate(core.generate_ids(ids, params, session)):
            tokens.append(int(new[0]))
            if len(tokens) == 10:
                victim.proc.send_signal(signal.SIGKILL)
        model.run(session.close())
    assert tokens == expected
    assert session.node_pushes > 0 and session.hops[-1].node.address != second
