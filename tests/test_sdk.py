"""The Python SDK over real nodes: text prompts, batches of prompts, streaming, multi-turn sessions, async."""

from __future__ import annotations

import pytest
import torch
from swarm import start_nodes, stop_all
from transformers import AutoModelForCausalLM, AutoTokenizer

from torchnode import AsyncDistributedModel, DistributedModel

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers


@pytest.fixture(scope="module")
def nodes(tiny_llama):
    nodes = start_nodes(str(tiny_llama), ["0:2", "2:4"])
    yield nodes
    stop_all(nodes)


@pytest.fixture(scope="module")
def model(tiny_llama, nodes):
    with DistributedModel.from_pretrained(str(tiny_llama), peers=[n.address for n in nodes]) as m:
        yield m


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        tiny_llama
    )


def hf_generate(hf, ids: torch.Tensor, n: int) -> torch.Tensor:
    return hf[0].generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))


def test_generate_from_text_equals_transformers(model, hf):
    ids = hf[1]("Hello there", return_tensors="pt").input_ids
    assert model.generate("Hello there", max_new_tokens=32).tolist() == hf_generate(hf, ids, 32).tolist()


def test_batch_of_prompts_in_one_call(model):
    prompts = ["The sky", "A quick brown fox jumps", "Once"]
    together = model.generate(prompts, max_new_tokens=12)
    alone = [model.generate(p, max_new_tokens=12) for p in prompts]
    assert [t.tolist() for t in together] == [a.tolist() for a in alone]


def test_stream_joins_to_generate_text(model, hf):
    out = model.generate("Hello there", max_new_tokens=24)
    text = hf[1].decode(out[0, len(hf[1]("Hello there").input_ids) :], skip_special_tokens=True)
    assert "".join(model.stream("Hello there", max_new_tokens=24)) == text


def test_stop_string_ends_stream(model):
    full = "".join(model.stream("Hello there", max_new_tokens=24))
    stop = full[5:8]
    assert stop and "".join(model.stream("Hello there", max_new_tokens=24, stop=(stop,))) == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(model):
    a = model.generate("Hello", max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=3)
    b = model.generate("Hello", max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=3)
    assert a.tolist() == b.tolist()


def test_multi_turn_session_keeps_cache_and_equals_one_shot(model, hf):
    """The second turn sends only the tokens the nodes have not seen: its first step starts where the first
    turn's cache ends (the common prefix) and carries the rest of the conversation, not all of it."""
    tokenizer = hf[1]
    conversation = [{"role": "user", "content": "Hi!"}]
    with model.session(max_length=256) as s:
        sent: list[tuple[int, int]] = []  # (position, tokens) of every step the session sends to the nodes
        core = s._core.session
        step = core.step

        async def recording_step(hidden, position=None):
            sent.append((core.position if position is None else position, hidden.shape[1]))
            return await step(hidden, position)

        core.step = recording_step
        first = s.generate(conversation, max_new_tokens=10)
        prompt_one = len(model.async_model.encode(conversation)[0])
        reply = tokenizer.decode(first[0, prompt_one:], skip_special_tokens=True)
        conversation += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        turn_one = len(sent)
        second = s.generate(conversation, max_new_tokens=10)
    ids = model.async_model.encode(conversation)[0].tolist()
    cached = first[0].tolist()[:-1]  # the newest token of turn one never went through the nodes
    common = next(i for i, (a, b) in enumerate(zip(ids + [None], cached + [-1], strict=False)) if a != b)
    assert prompt_one <= common < len(ids)  # at least turn one's prompt is reused
    position, tokens = sent[turn_one]
    assert (position, tokens) == (common, len(ids) - common), "the second turn re-sent what the nodes hold"
    assert sum(t for _, t in sent[turn_one:]) == len(ids) - common + second.shape[1] - len(ids) - 1
    assert second.tolist() == hf_generate(hf, model.async_model.encode(conversation), 10).tolist()


def test_session_plain_text_continues(model, hf):
    tokenizer = hf[1]
    with model.session(max_length=128) as s:
        first = s.generate("Hello", max_new_tokens=8)
        second = s.generate(" again", max_new_tokens=8)
    context = torch.cat([first, tokenizer(" again", add_special_tokens=False, return_tensors="pt").input_ids], dim=1)
    assert second.tolist() == hf_generate(hf, context, 8).tolist()


async def test_async_model(tiny_llama, nodes, hf):
    async with await AsyncDistributedModel.from_pretrained(str(tiny_llama), peers=[n.address for n in nodes]) as m:
        ids = hf[1]("Hello there", return_tensors="pt").input_ids
        assert (await m.generate(ids, max_new_tokens=16)).tolist() == hf_generate(hf, ids, 16).tolist()
        pieces = [p async for p in m.stream("Hello there", max_new_tokens=8)]
        assert pieces
