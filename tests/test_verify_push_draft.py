"""Unit tier: --verify no longer costs the speed features. With node-to-node push (the default) and with speculative
decoding (`--draft ngram`), a verifying client over in-memory nodes (the real span backend; memory nodes push to
each other) still pushes and drafts, catches a liar, and returns exactly the all-honest greedy output; drafted
tokens are released only once the outputs they came from are checked."""

from __future__ import annotations

import logging

import pytest
import torch
from dishonest_node import MODES, dishonest_memory_node
from greedy import new_greedy_tokens
from memory_node import MemoryNode, MemoryPeers

from torchnode.client.model import AsyncDistributedModel
from torchnode.client.sampling import SamplingParams
from torchnode.client.session import RetryPolicy
from torchnode.client.speculative import ModelDrafter, NgramDrafter, SpeculationStats, speculative_ids

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300, 12, 17, 42, 99, 7, 300]])  # repeats: prompt lookup drafts
NEW = 24
WINDOW = 8
FAST_RETRY = RetryPolicy(max_attempts=3, max_seconds=5.0, backoff_initial=0.01, backoff_max=0.05)


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    return new_greedy_tokens(tiny_llama, PROMPT, NEW)


@pytest.fixture
def swarm(ckpt):
    """Honest 0:2 and 2:4, and room for a liar of 2:4 that routing prefers (it claims to be fast)."""
    made = [MemoryNode(ckpt, 0, 2, "a:1", throughput=5.0), MemoryNode(ckpt, 2, 4, "c:1", throughput=5.0)]
    yield made
    for node in made:
        node.shutdown()


def with_liar(swarm, ckpt, mode: str) -> MemoryNode:
    bad = dishonest_memory_node(ckpt, 2, 4, "b:1", mode)
    bad.backend.throughput = 10_000.0
    swarm.append(bad)
    return bad


def client(ckpt, nodes, **kwargs) -> AsyncDistributedModel:
    kwargs = {"verify": True, "verify_window": WINDOW, "push_min_rtt_ms": 0, **kwargs}  # memory nodes are near
    return AsyncDistributedModel(ckpt, MemoryPeers(nodes), step_timeout=5.0, retry=FAST_RETRY, **kwargs)


def named(caplog, node) -> bool:
    return any("dishonest" in r.message and node.address in r.message for r in caplog.records)


@pytest.mark.parametrize("mode", MODES)
async def test_verify_with_push_pushes_catches_the_liar_and_equals_greedy(ckpt, swarm, expected, mode, caplog):
    bad = with_liar(swarm, ckpt, mode)
    model = client(ckpt, swarm)
    session = await model.open_session(PROMPT.shape[1] + NEW)
    assert session.push, "--verify no longer turns push off"
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    with caplog.at_level(logging.WARNING):
        tokens = [int(t[0]) async for t in model.generate_ids(PROMPT, params, session)]
    pushes = session.node_pushes
    await session.close()
    assert tokens == expected
    assert bad.backend.lies and named(caplog, bad) and model.dishonest == {bad.address}
    assert pushes > 0 and swarm[0].pushed > 0  # the honest first hop pushed its outputs on


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("push", [True, False], ids=["push", "no-push"])
async def test_verify_with_a_draft_catches_the_liar_and_equals_greedy(ckpt, swarm, expected, mode, push, caplog):
    bad = with_liar(swarm, ckpt, mode)
    model = client(ckpt, swarm, push=push)
    session = await model.open_session(PROMPT.shape[1] + NEW)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    stats, released_at = SpeculationStats(), []
    tokens = []
    with caplog.at_level(logging.WARNING):
        async for t in speculative_ids(
            model.heads, session, PROMPT, params, model.eos_ids, NgramDrafter(), 4, 0, stats
        ):
            # the token at index T + n came from the output at position T + n - 1
            released_at.append((PROMPT.shape[1] + len(tokens) - 1, session.verifier.verified))
            tokens.append(int(t[0]))
    await session.close()
    assert tokens == expected
    assert bad.backend.lies and named(caplog, bad)
    assert stats.drafted > 0  # drafts went through the chain and were checked like any output
    assert all(position < verified for position, verified in released_at)  # nothing released unchecked


class CountingNgram(NgramDrafter):
    drafted = 0

    def propose(self, ids, k, params, generator):
        draft = super().propose(ids, k, params, generator)
        self.drafted += len(draft.tokens)
        return draft


async def test_generate_with_verify_and_draft_takes_the_speculative_path(ckpt, swarm, expected, caplog):
    bad = with_liar(swarm, ckpt, "decode")
    model = client(ckpt, swarm, draft="ngram", draft_tokens=4)
    model._drafters[("ngram", "none")] = drafter = CountingNgram()  # counts what `generate` drafts
    with caplog.at_level(logging.WARNING):
        out = await model.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert out[0, PROMPT.shape[1] :].tolist() == expected
    assert named(caplog, bad)
    assert drafter.drafted > 0, "a verifying client speculates too"


async def test_verify_with_drafts_written_ahead_catches_the_liar_and_equals_greedy(ckpt, tiny_llama, swarm, expected):
    """A draft model's next draft is written while a pass is in flight (DraftAhead); when a check voids tokens,
    the pending draft is dropped with them, and the output is still the all-honest greedy one."""
    from transformers import AutoModelForCausalLM

    bad = with_liar(swarm, ckpt, "random")  # it lies on multi-token passes too
    model = client(ckpt, swarm)
    drafter = ModelDrafter(AutoModelForCausalLM.from_pretrained(tiny_llama), ckpt.hf_config.vocab_size)
    session = await model.open_session(PROMPT.shape[1] + NEW)
    params, stats = SamplingParams(max_new_tokens=NEW, ignore_eos=True), SpeculationStats()
    ids = speculative_ids(model.heads, session, PROMPT, params, model.eos_ids, drafter, 4, 0, stats)
    tokens = [int(t[0]) async for t in ids]
    await session.close()
    assert tokens == expected
    assert bad.backend.lies and model.dishonest == {bad.address}
    assert stats.ahead > 0  # the target drafting for itself: most passes leave with a draft written ahead
