"""The client's LM head merged across concurrent sessions (client/head_batcher.py): every session's
greedy tokens equal the ones it gets alone, while the head runs far fewer, wider passes; a bad request
fails by itself. In-memory nodes (the real span backend) and the tiny Llama."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from memory_node import MemoryNode, MemoryPeers

from torchnode.client.head_batcher import HeadBatcher
from torchnode.client.model import AsyncDistributedModel
from torchnode.client.sampling import SamplingParams
from torchnode.models.checkpoint import resolve
from torchnode.models.families import load_head

TOKENS = 10


def prompt(tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 259, (1, tokens), generator=torch.Generator().manual_seed(seed))


def count_head_rows(head) -> list[int]:
    """Records the rows (B * T) of every real LM-head call; the head itself still computes."""
    rows: list[int] = []
    real = head.logits

    def counting(hidden: torch.Tensor) -> torch.Tensor:
        rows.append(hidden.reshape(-1, hidden.shape[-1]).shape[0])
        return real(hidden)

    head.logits = counting
    return rows


async def tokens_of(model: AsyncDistributedModel, ids: torch.Tensor, draft: str | None = None) -> list[int]:
    params = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    options = model.generation.override(draft=draft)
    return [int(new[0]) async for new in model.generate_ids(ids, params, options=options)]


@pytest.fixture
def model(tiny_llama):
    ckpt = resolve(str(tiny_llama))
    nodes = [MemoryNode(ckpt, 0, 2, "a:1"), MemoryNode(ckpt, 2, 4, "b:1")]
    yield AsyncDistributedModel(ckpt, MemoryPeers(nodes), step_timeout=10.0)
    for node in nodes:
        node.shutdown()


async def test_concurrent_sessions_share_head_passes_and_equal_each_alone(model):
    prompts = [prompt(n, seed) for seed, n in enumerate((3, 7, 12, 5, 20, 9))]
    rows = count_head_rows(model.head)
    alone = [await tokens_of(model, ids) for ids in prompts]
    alone_calls = len(rows)
    assert alone_calls == len(prompts) * TOKENS  # one head call per session per token

    rows.clear()
    together = await asyncio.gather(*(tokens_of(model, ids) for ids in prompts))
    assert together == alone
    # How the sessions line up depends on the machine's load (prefills differ in length); that they share
    # passes does not: the head matrix is read at most half as often.
    assert len(rows) <= alone_calls // 2, rows
    assert sum(rows) == alone_calls  # every session's row computed exactly once


async def test_speculative_and_plain_sessions_merge_too(model):
    repetitive = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])  # the n-gram drafter proposes from this
    plain = [prompt(6, 11), prompt(14, 12)]
    alone = [await tokens_of(model, repetitive, draft="ngram")] + [await tokens_of(model, ids) for ids in plain]
    alone_plain = [await tokens_of(model, repetitive)]
    rows = count_head_rows(model.head)
    speculative = tokens_of(model, repetitive, draft="ngram")
    together = await asyncio.gather(speculative, *(tokens_of(model, ids) for ids in plain))
    assert together == alone
    assert together[0] == alone_plain[0]  # speculative greedy = plain greedy, merged or not
    assert max(rows) > 2, rows  # a multi-row speculative request shared a pass with the plain ones


async def test_scoring_logits_go_through_the_batcher_and_match_transformers(model, tiny_llama):
    from transformers import AutoModelForCausalLM

    ids = prompt(9, 3)
    rows = count_head_rows(model.head)
    got = await model.logits(ids)  # (1, 9, V)
    with torch.inference_mode():
        expected = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()(ids).logits
    assert rows == [9]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


async def test_requests_made_together_run_as_one_pass(tiny_llama):
    head = load_head(resolve(str(tiny_llama)))
    rows = count_head_rows(head)
    batcher = HeadBatcher(head)
    hiddens = [torch.randn(1, t, head.norm.weight.shape[0]) for t in (1, 1, 3, 1, 2, 1)]
    results = await asyncio.gather(*(batcher.logits(h) for h in hiddens))
    assert rows == [9] and batcher.passes == 1  # all six callers' rows in one matrix product
    for hidden, got in zip(hiddens, results, strict=True):
        torch.testing.assert_close(got, head.logits(hidden), atol=1e-5, rtol=1e-5)


async def test_greedy_requests_get_their_argmax_from_the_shared_pass(tiny_llama):
    head = load_head(resolve(str(tiny_llama)))
    rows = count_head_rows(head)
    batcher = HeadBatcher(head)
    hiddens = [torch.randn(b, t, head.norm.weight.shape[0]) for b, t in ((1, 1), (2, 3), (1, 1), (3, 1))]
    asks = [batcher.greedy(h) if i % 2 == 0 else batcher.logits(h) for i, h in enumerate(hiddens)]
    results = await asyncio.gather(*asks)
    assert rows == [1 + 6 + 1 + 3] and batcher.passes == 1  # greedy and plain callers in one matrix product
    for i, (hidden, got) in enumerate(zip(hiddens, results, strict=True)):
        expected = head.logits(hidden)
        if i % 2 == 0:
            logits, ids = got
            assert ids.shape == hidden.shape[:-1] and torch.equal(ids, logits.argmax(-1))
        else:
            logits = got
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    logits, ids = await batcher.greedy(hiddens[1])  # alone: its own pass, its own argmax
    assert torch.equal(ids, head.logits(hiddens[1]).argmax(-1)) and batcher.passes == 2


def test_padded_head_passes_equal_the_plain_projection(tiny_llama):
    """Head.logits pads 7-15 rows to 16 on a CPU (MKL's slow path): every shape gives what the plain
    norm + projection gives, row for row."""
    head = load_head(resolve(str(tiny_llama)))
    for shape in ((1, 1), (6, 1), (7, 1), (1, 9), (3, 4), (15, 1), (16, 1), (2, 9)):
        hidden = torch.randn(*shape, head.norm.weight.shape[0])
        with torch.inference_mode():
            plain = head.lm_head(head.norm(hidden)).float()
        got = head.logits(hidden)
        assert got.shape == (*shape, head.lm_head.weight.shape[0])
        torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)


async def test_a_bad_request_fails_alone(tiny_llama):
    head = load_head(resolve(str(tiny_llama)))
    batcher = HeadBatcher(head)
    hidden = torch.randn(2, 3, head.norm.weight.shape[0])  # (B, T, H)
    good, bad = await asyncio.gather(
        batcher.logits(hidden), batcher.logits(torch.randn(1, 1, 7)), return_exceptions=True
    )
    assert isinstance(bad, RuntimeError)
    assert torch.equal(good, head.logits(hidden))
    assert batcher.passes == 2  # the merged pass failed, then each ran alone


async def test_a_lone_caller_gets_exactly_the_heads_result(tiny_llama):
    head = load_head(resolve(str(tiny_llama)))
    hidden = torch.randn(1, 4, head.norm.weight.shape[0])
    for off_loop in (True, False):
        assert torch.equal(await HeadBatcher(head, off_loop=off_loop).logits(hidden), head.logits(hidden))


async def test_a_pass_waits_for_every_decoding_member_then_runs_once(tiny_llama):
    head = load_head(resolve(str(tiny_llama)))
    rows = count_head_rows(head)
    batcher = HeadBatcher(head, max_wait=5.0)
    hidden = torch.randn(1, 1, head.norm.weight.shape[0])

    async def late(member, delay):
        await asyncio.sleep(delay)  # this session's node round trip
        return await batcher.logits(hidden, member)

    with batcher.decoding() as a, batcher.decoding() as b, batcher.decoding() as c:
        await asyncio.gather(batcher.logits(hidden, a), late(b, 0.05), late(c, 0.1))
    assert rows == [3]  # not [1, 1, 1]: the first request waited for the two members still at their nodes


def gathering(batcher: HeadBatcher) -> asyncio.Event:
    """Set when the batcher's pass starts waiting for its members: the pass runs on until its first await,
    which is that wait, before a task woken by the event runs. A pass that does not wait never sets it."""
    started, gather = asyncio.Event(), batcher._gather

    async def observed(loop, queue):
        started.set()
        await gather(loop, queue)

    batcher._gather = observed
    return started


async def test_a_missing_member_holds_a_pass_only_max_wait_and_one_that_leaves_not_at_all(tiny_llama):
    head = load_head(resolve(str(tiny_llama)))
    rows = count_head_rows(head)
    hidden = torch.randn(1, 1, head.norm.weight.shape[0])
    batcher = HeadBatcher(head, max_wait=0.2)
    with batcher.decoding() as a, batcher.decoding():  # the second member never asks (stuck in failover)
        started = time.monotonic()
        await batcher.logits(hidden, a)
        waited = time.monotonic() - started
    assert rows == [1] and 0.2 <= waited < 2.0

    patient = HeadBatcher(head, max_wait=30.0)
    with patient.decoding() as a:
        other = patient.decoding()
        other.__enter__()
        waiting = gathering(patient)
        request = asyncio.ensure_future(patient.logits(hidden, a))
        await asyncio.wait_for(waiting.wait(), 5.0)  # the pass waits for the other member
        assert not request.done() and patient.passes == 0
        other.__exit__(None, None, None)  # it finished generating: the pass runs now
        await asyncio.wait_for(request, 5.0)
