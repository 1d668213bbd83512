"""Speculative decoding and pipelined prefill.

Unit tier (in-memory nodes running the real span backend): greedy output with `ngram` and with draft
models equals plain greedy (transformers), token for token; speculative sampling keeps the target's
distribution (statistical tests with bounds that a wrong sampler fails); K adapts down on text with
nothing to copy; a prompt sent through the chain in pipelined chunks gives the one-shot logits.
Process tier: the `torchnode generate --draft` CLI against real node processes.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from memory_node import MemoryNode, MemoryPeers
from swarm import run_cli, start_nodes, stop_all
from tiny_models import EOS_ID, save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from torchnode.client.model import AsyncDistributedModel
from torchnode.client.sampling import SamplingParams
from torchnode.client.speculative import (
    Draft,
    DraftError,
    DraftLength,
    NgramDrafter,
    SpeculationStats,
    accept,
    load_drafter,
    speculative_ids,
)
from torchnode.client.sync_model import DistributedModel
from torchnode.models.checkpoint import resolve
from torchnode.models.quantization import Int4Linear, Int8Linear

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

TINY_PROMPT = "The quick brown fox jumps over the lazy dog while the small cat"
NEW = 24
COPY_TEXT = (
    "Every morning the little robot read books about the sea, the mountains and the rivers, and every "
    "evening it wrote short stories about the forests where it had never been."
)


def hf_greedy(path_or_model, ids: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens of plain transformers, past EOS too (as ignore_eos)."""
    hf = path_or_model
    if not isinstance(hf, torch.nn.Module):
        hf = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32).eval()
    out = ids
    with torch.no_grad():
        for _ in range(n):
            out = torch.cat([out, hf(out).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out[0, ids.shape[1] :].tolist()


async def run_speculative(model: AsyncDistributedModel, ids, params, drafter, k: int = 8, ahead: bool = True):
    """New tokens and what the passes did, through a fresh session."""
    stats = SpeculationStats()
    session = await model.open_session(ids.shape[1] + params.max_new_tokens)
    try:
        new = speculative_ids(model.head, session, ids, params, model.eos_ids, drafter, k, stats=stats, ahead=ahead)
        return [int(t) async for t in new], stats
    finally:
        await session.close()


# ---- fixtures


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    ckpt = resolve(str(tiny_llama))
    nodes = [MemoryNode(ckpt, 0, 2, "a:1"), MemoryNode(ckpt, 2, 4, "b:1")]
    yield AsyncDistributedModel(ckpt, MemoryPeers(nodes), step_timeout=5.0)
    for node in nodes:
        node.shutdown()


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """A second small model with the same tokenizer: a draft that often disagrees with the target."""
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="module")
def smollm2(default_checkpoint):
    nodes = [MemoryNode(default_checkpoint, 0, 15, "a:1"), MemoryNode(default_checkpoint, 15, 30, "b:1")]
    yield AsyncDistributedModel(default_checkpoint, MemoryPeers(nodes), step_timeout=30.0)
    for node in nodes:
        node.shutdown()


# ---- greedy: identical to plain greedy


async def test_ngram_greedy_equals_plain_greedy_and_copies_in_few_passes(smollm2):
    """SmolLM2 copying a text: the plain loop's tokens (the loop test_inference_e2e checks against
    transformers), in far fewer passes through the chain."""
    ids = smollm2.encode([{"role": "user", "content": f"Repeat this text exactly: {COPY_TEXT}"}])
    plain = await smollm2.generate(ids, max_new_tokens=32)
    expected = plain[0, ids.shape[1] :].tolist()
    assert len(expected) == 32 and smollm2.tokenizer.decode(expected).startswith(COPY_TEXT[:40])

    got, stats = await run_speculative(smollm2, ids, SamplingParams(max_new_tokens=32), NgramDrafter())

    assert got == expected
    assert stats.passes <= len(got) / 2  # the copy is cheap: at least 2 tokens per pass through the chain
    sdk = await smollm2.generate(ids, draft="ngram", max_new_tokens=32)  # the SDK keywords take the same path
    assert sdk.tolist() == plain.tolist()


async def test_draft_models_greedy_equal_plain_greedy(tiny, tiny_llama, tiny_qwen3):
    ids = tiny.encode(TINY_PROMPT)
    expected = hf_greedy(tiny_llama, ids, NEW)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)

    itself, stats = await run_speculative(tiny, ids, params, load_drafter(str(tiny_llama), tiny.tokenizer, 512))
    assert itself == expected
    assert stats.accepted == stats.drafted > 0 and stats.passes < NEW / 3  # the target agrees with itself

    other, stats = await run_speculative(tiny, ids, params, load_drafter(str(tiny_qwen3), tiny.tokenizer, 512))
    assert other == expected
    assert stats.drafted > stats.accepted  # rejections happened, and were rewound

    sdk = await tiny.generate(ids, draft=str(tiny_qwen3), draft_tokens=4, max_new_tokens=NEW, ignore_eos=True)
    assert sdk[0, ids.shape[1] :].tolist() == expected


async def test_chat_session_turns_with_a_draft_equal_plain_turns(tiny, tiny_llama):
    """Turns rewind the nodes past rejected drafts of the turn before; the tokens stay plain greedy's."""
    outputs = {}
    for draft in (None, str(tiny_llama), "ngram"):
        conversation, replies = [{"role": "user", "content": "Hello, world!"}], []
        async with tiny.session(max_length=256, draft=draft) as session:
            for follow_up in ("How are you today?", "What is the capital of France?"):
                out = await session.generate(conversation, max_new_tokens=12, ignore_eos=True)
                reply = tiny.tokenizer.decode(out[0, -12:])
                replies.append(out[0].tolist())
                conversation += [{"role": "assistant", "content": reply}, {"role": "user", "content": follow_up}]
        outputs[draft] = replies
    assert outputs[str(tiny_llama)] == outputs[None] == outputs["ngram"]


# ---- sampling: the target's distribution


def l1(counts: torch.Tensor, p: torch.Tensor) -> float:
    return float((counts / counts.sum() - p.detach()).abs().sum())


def l1_bound(categories: int, draws: int, failure: float) -> float:
    """L1 distance that the empirical distribution of `draws` exceeds with probability below `failure`
    (Bretagnolle-Huber-Carol: P(L1 >= x) <= 2^m exp(-n x^2 / 2))."""
    return math.sqrt(2 * (categories * math.log(2) - math.log(failure)) / draws)


def test_speculative_sampling_keeps_the_joint_distribution_of_two_tokens():
    """A toy two-token model p and a draft q far from it: two drafted tokens per pass, tokens the pass does
    not produce come from p directly. The pairs are distributed as p, not as q, within a bound that a
    correct sampler exceeds with probability < 1e-9 and that q's pairs miss by a wide margin."""
    p1 = torch.tensor([0.5, 0.3, 0.2])
    p2 = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])  # p(t2 | t1)
    q1 = torch.tensor([0.1, 0.2, 0.7])
    q2 = torch.tensor([[0.1, 0.1, 0.8], [0.7, 0.2, 0.1], [0.3, 0.4, 0.3]])
    target, proposal = (p1[:, None] * p2).flatten(), (q1[:, None] * q2).flatten()  # (9,) joint of (t1, t2)
    draws, failure = 10000, 1e-9
    bound = l1_bound(9, draws, failure)
    assert float((target - proposal).abs().sum()) > 3 * bound  # the test tells p from q

    params, generator = SamplingParams(temperature=1.0), torch.Generator().manual_seed(0)
    counts = torch.zeros(9)
    for _ in range(draws):
        d1 = int(torch.multinomial(q1, 1, generator=generator))
        d2 = int(torch.multinomial(q2[d1], 1, generator=generator))
        logits = torch.stack([p1, p2[d1], torch.full((3,), 1 / 3)]).log()  # (K + 1, V): rows given d1, d2
        new = accept(logits, Draft([d1, d2], torch.stack([q1, q2[d1]])), params, [], generator)
        t1 = new[0]
        t2 = new[1] if len(new) > 1 else int(torch.multinomial(p2[t1], 1, generator=generator))
        counts[3 * t1 + t2] += 1
    assert l1(counts, target) < bound, (counts / draws, target)


def self_copying_prompt(hf, tokenizer) -> tuple[torch.Tensor, int]:
    """Ids [x, d, <text>, x] where d is one of the target's top 3 after them, with probability (under top-k 3)
    between 0.25 and 0.6: ngram then drafts d, which a correct sampler keeps with probability p(d)."""
    base = tokenizer(" over the lazy dog while the small cat", return_tensors="pt").input_ids[0].tolist()
    x = base[-1]
    candidates = torch.tensor([[x, d, *base] for d in range(tokenizer.vocab_size)])  # (V, T)
    with torch.no_grad():
        logits = hf(candidates).logits[:, -1]  # (V, V)
    top = torch.topk(logits, 3)
    probs = top.values.softmax(-1)
    for d in range(len(candidates)):
        hits = (top.indices[d] == d).nonzero()
        if len(hits) and 0.25 < float(probs[d, hits[0, 0]]) < 0.6:
            return candidates[d : d + 1], d
    raise AssertionError("no prompt copies a likely token")


async def test_sampling_through_the_chain_keeps_the_target_distribution(tiny, tiny_llama):
    """First tokens sampled (top-k 3), one seed each, with ngram drafting a token d of probability p(d):
    their distribution is the target's, not "always d" (every draft kept) nor "never d" (every draft
    rejected); the bound below is exceeded by chance with probability < 1e-6 and misses both wrong ones."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids, d = self_copying_prompt(hf, tiny.tokenizer)
    with torch.no_grad():
        top = torch.topk(hf(ids).logits[0, -1], 3)
    tokens, target = top.indices.tolist(), top.values.softmax(-1)  # (3,)
    draws = 250
    bound = l1_bound(3, draws, 1e-6)
    p_d = float(target[tokens.index(d)])
    assert 2 * min(p_d, 1 - p_d) > bound + 0.1  # "always d" and "never d" are both far outside the bound

    counts = torch.zeros(3)
    params = dict(temperature=1.0, top_k=3, max_new_tokens=2, ignore_eos=True)
    for seed in range(draws):
        out = await tiny.generate(ids, draft="ngram", draft_tokens=1, seed=seed, **params)
        first = int(out[0, ids.shape[1]])
        assert first in tokens
        counts[tokens.index(first)] += 1
    assert l1(counts, target) < bound, (counts / draws, target, d)
    assert 0 < counts[tokens.index(d)] < draws


async def test_sampling_with_a_draft_model_is_reproducible_with_a_seed(tiny, tiny_qwen3):
    ids = tiny.encode(TINY_PROMPT)
    runs = [
        await tiny.generate(ids, draft=str(tiny_qwen3), seed=seed, temperature=0.8, max_new_tokens=12, ignore_eos=True)
        for seed in (1, 1, 2)
    ]
    assert runs[0].tolist() == runs[1].tolist() != runs[2].tolist()


# ---- K adapts


def test_draft_length_falls_to_zero_with_probes_and_recovers():
    length = DraftLength(max_tokens=8)
    for _ in range(10):
        length.update(length.next() or 1, 0)  # every draft rejected
    ks = [length.next() for _ in range(16)]
    assert ks.count(0) == 14 and ks.count(1) == 2  # nothing sent but a one-token probe every 8 passes
    for _ in range(6):
        k = max(length.next(), 1)
        length.update(k, k)  # the text starts repeating itself: everything is kept
    assert length.next() == 8


async def test_ngram_on_text_with_nothing_to_copy_stops_drafting(tiny, tiny_llama):
    ids = tiny.encode("Numbers 0 1 2 3")
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    got, stats = await run_speculative(tiny, ids, params, NgramDrafter())
    assert got == hf_greedy(tiny_llama, ids, 40)
    assert stats.accepted == 0 and stats.passes == 40  # nothing to copy: one pass per token, as plain
    assert max(stats.lengths[-10:]) <= 1 and sum(stats.lengths[-10:]) <= 3  # zero, but for a few probes
    assert stats.drafted < 15  # drafting stopped instead of sending K rejected tokens every pass


# ---- pipelined prefill


@pytest.fixture
def three_hops(tiny_llama):
    ckpt = resolve(str(tiny_llama))
    nodes = [
        MemoryNode(ckpt, 0, 2, "a:1"),
        MemoryNode(ckpt, 2, 3, "b:1"),
        MemoryNode(ckpt, 3, 4, "c:1"),
        MemoryNode(ckpt, 2, 3, "b:2"),
    ]
    yield ckpt, nodes
    for node in nodes:
        node.shutdown()


async def test_pipelined_prefill_equals_one_shot_prefill(three_hops):
    ckpt, nodes = three_hops
    model = AsyncDistributedModel(ckpt, MemoryPeers(nodes[:3]))
    x = torch.randn(1, 50, 64, generator=torch.Generator().manual_seed(0))
    one = await model.open_session(64)
    expected = await one.prefill(x, chunk=0)
    piped = await model.open_session(64)
    got = await piped.prefill(x, chunk=8)
    assert (got - expected).abs().max() < 1e-4
    assert [s.positions for s in (n.sessions[-1] for n in nodes[:3])] == [[0, 8, 16, 24, 32, 40, 48]] * 3
    # the next step continues from the chunked caches as from the one-shot ones
    y = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(1))
    assert (await piped.step(y) - await one.step(y)).abs().max() < 1e-4
    await one.close()
    await piped.close()


def record_step_times(node: MemoryNode, log: list[tuple[str, int, str, float]]) -> None:
    """Node side: (address, position, "start" | "end", time) of every step the node serves, in `log`."""
    open_session = node.open_session

    def timed_open(spec):
        session = open_session(spec)
        pushed_step = session.pushed_step

        async def timed(hidden, position, *args, **kwargs):
            log.append((node.address, position, "start", time.monotonic()))
            try:
                return await pushed_step(hidden, position, *args, **kwargs)
            finally:
                log.append((node.address, position, "end", time.monotonic()))

        session.pushed_step = timed
        return session

    node.open_session = timed_open


async def test_pipelined_prefill_overlaps_the_hops(three_hops):
    """The first node works on chunk k + 1 while the second still works on chunk k (the nodes' own times):
    a prefill that sent the chunks one after the other through the chain would never do that."""
    ckpt, nodes = three_hops
    log: list[tuple[str, int, str, float]] = []
    for node in nodes[:3]:
        node.step_delay = 0.02  # a network leg per step: each hop's step awaits, as over gRPC
        record_step_times(node, log)
    model = AsyncDistributedModel(ckpt, MemoryPeers(nodes[:3]))
    session = await model.open_session(64)
    await session.prefill(torch.randn(1, 48, 64, generator=torch.Generator().manual_seed(0)), chunk=8)
    await session.close()
    when = {(address, position, edge): t for address, position, edge, t in log}
    first, second = (hop.node.address for hop in session.hops[:2])
    overlaps = [k for k in range(0, 40, 8) if when[first, k + 8, "start"] < when[second, k, "end"]]
    assert overlaps == list(range(0, 40, 8)), f"chunks whose successor started on hop 1 in time: {overlaps}"


async def test_pipelined_prefill_falls_back_when_a_node_fails_midway(three_hops):
    ckpt, nodes = three_hops
    model = AsyncDistributedModel(ckpt, MemoryPeers(nodes))
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(0))
    reference = await model.open_session(64)
    expected = await reference.prefill(x, chunk=0)
    await reference.close()

    session = await model.open_session(64)
    middle = next(n for n in nodes if n.address == session.hops[1].node.address)
    middle.fail_after(2)  # dies on its third chunk
    got = await session.prefill(x, chunk=8)
    assert (got - expected).abs().max() < 1e-4
    assert middle.address in model.bans.banned()
    await session.close()


async def test_generation_with_chunked_prefill_equals_transformers(tiny_llama):
    ckpt = resolve(str(tiny_llama))
    nodes = [MemoryNode(ckpt, 0, 2, "a:1"), MemoryNode(ckpt, 2, 4, "b:1")]
    model = AsyncDistributedModel(ckpt, MemoryPeers(nodes), prefill_chunk=4)
    ids = model.encode(TINY_PROMPT)
    assert ids.shape[1] > 8
    out = await model.generate(ids, max_new_tokens=12, ignore_eos=True)
    assert out[0, ids.shape[1] :].tolist() == hf_greedy(tiny_llama, ids, 12)
    assert len(nodes[0].sessions[-1].positions) == math.ceil(ids.shape[1] / 4) + 11
    for node in nodes:
        node.shutdown()


async def test_quantized_draft_of_smollm2_keeps_greedy_output_and_agrees_often(smollm2):
    """`--draft default --draft-quant int4|int8`: SmolLM2 drafting for itself with 4- or 8-bit linears (int4
    from the GGUF's own codes) is cheaper, not exact, so some drafts may be rejected; greedy output is still
    plain greedy's, and the draft agrees with the fp32 target often enough that a pass yields several tokens."""
    ids = smollm2.encode([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    plain = (await smollm2.generate(ids, max_new_tokens=32))[0, ids.shape[1] :].tolist()
    for quant, linear in (("int4", Int4Linear), ("int8", Int8Linear)):
        drafter = load_drafter("default", smollm2.tokenizer, smollm2.ckpt.hf_config.vocab_size, quant)
        assert isinstance(drafter.model.lm_head, linear) and isinstance(
            drafter.model.model.layers[0].mlp.up_proj, linear
        )
        got, stats = await run_speculative(smollm2, ids, SamplingParams(max_new_tokens=32), drafter)
        assert got == plain, quant
        assert stats.passes <= len(got) / 2.5, (quant, stats)  # measured: 8 passes for 32 tokens (int4)
        assert stats.ahead > 0, (quant, stats)  # some passes left with a draft written during the previous one
        # drafting only between passes: the same output; the drafts themselves may differ in a near-tie (the
        # draft model is fed its tokens in other groupings), so only the output is compared
        serial, serial_stats = await run_speculative(
            smollm2, ids, SamplingParams(max_new_tokens=32), drafter, ahead=False
        )
        assert serial == plain and serial_stats.ahead == 0


# ---- bad input


async def test_bad_draft_options_are_clear_errors(tiny, tmp_path):
    with pytest.raises(DraftError, match="neither 'ngram' nor a loadable model"):
        await tiny.generate(TINY_PROMPT, draft=str(tmp_path / "missing"), max_new_tokens=2)
    with pytest.raises(DraftError, match="does not use the target model's tokenizer"):
        load_drafter("default", tiny.tokenizer, 512)
    with pytest.raises(DraftError, match="needs a draft model"):
        load_drafter("ngram", tiny.tokenizer, 512, "int4")
    with pytest.raises(DraftError, match="unknown draft quantization 'int3'"):
        load_drafter(str(tmp_path), tiny.tokenizer, 512, "int3")
    with pytest.raises(ValueError, match="draft_tokens must be >= 0"):
        await tiny.generate(TINY_PROMPT, draft="ngram", draft_tokens=-1, max_new_tokens=2)


# ---- process tier: real nodes started by the CLI


def test_real_nodes_with_drafts_equal_plain_greedy(tiny_llama):
    """`torchnode generate --draft ngram` (the CLI) and a draft model (the SDK) over node processes."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer(TINY_PROMPT, return_tensors="pt").input_ids
    expected = hf_greedy(hf, ids, NEW)
    nodes = start_nodes(str(tiny_llama), ["0:2", "2:4"])
    try:
        peers = ",".join(n.address for n in nodes)
        result = run_cli(
            "generate",
            str(tiny_llama),
            TINY_PROMPT,
            "--peers",
            peers,
            "--max-new-tokens",
            str(NEW),
            "--draft",
            "ngram",
            "--draft-tokens",
            "4",
        )
        assert result.returncode == 0, result.stderr
        until_eos = expected[: expected.index(EOS_ID) + 1] if EOS_ID in expected else expected
        assert result.stdout == tokenizer.decode(until_eos, skip_special_tokens=True) + "\n"
        with DistributedModel.from_pretrained(str(tiny_llama), [n.address for n in nodes]) as model:
            out = model.generate(ids, draft=str(tiny_llama), max_new_tokens=NEW, ignore_eos=True)
            assert out[0, ids.shape[1] :].tolist() == expected
        quantized = run_cli(
            "generate",
            str(tiny_llama),
            TINY_PROMPT,
            "--peers",
            peers,
            "--max-new-tokens",
            str(NEW),
            "--draft",
            str(tiny_llama),
            "--draft-quant",
            "int8",
        )
        assert quantized.returncode == 0 and quantized.stdout == result.stdout, quantized.stderr
        lone = run_cli("generate", str(tiny_llama), "Hi", "--peers", peers, "--draft-quant", "int4")
        assert lone.returncode == 2 and "--draft-quant" in lone.stderr and "--draft MODEL" in lone.stderr
        bad = run_cli("generate", str(tiny_llama), "Hi", "--peers", peers, "--draft", "/no/such/model")
        assert bad.returncode == 2 and "--draft" in bad.stderr and "/no/such/model" in bad.stderr
    finally:
        stop_all(nodes)
