"""The OpenAI API over a swarm serving LoRA adapters: `model="BASE:ADAPTER"` gives the local peft model's
greedy text, `model="BASE"` the base model's, an adapter no node serves is a 404 naming it, and /v1/models
lists one `BASE:ADAPTER` per adapter. Nodes are started by the CLI with --adapters (real gRPC on loopback).
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from greedy import local_greedy
from openai_server import NAME
from swarm import start_nodes, stop_all
from transformers import AutoTokenizer

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

MESSAGES = [{"role": "user", "content": "Write one line about the sea."}]


@pytest.fixture(scope="module")
def nodes(tiny_llama, adapters):
    nodes = start_nodes(str(tiny_llama), ["0:2", "2:4"], "--adapters", ",".join(str(p) for p in adapters.values()))
    yield nodes
    stop_all(nodes)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def expected_text(model, tokenizer, ids: torch.Tensor, n: int) -> str:
    return tokenizer.decode(local_greedy(model, ids, n)[ids.shape[1] :], skip_special_tokens=True)


def test_models_lists_base_then_each_adapter(client, api):
    ids = [NAME, f"{NAME}:tone-a", f"{NAME}:tone-b"]
    assert [m.id for m in client.models.list()] == ids
    assert client.models.retrieve(f"{NAME}:tone-b").id == f"{NAME}:tone-b"
    with pytest.raises(openai.NotFoundError, match="'nope'"):
        client.models.retrieve(f"{NAME}:nope")
    listing = api.servers[0][0].config.app.state.server.adapters  # the app's SwarmAdapters
    expires = listing.expires
    assert [m.id for m in client.models.list()] == ids and listing.expires == expires  # cached: no new probe
    schema = httpx.get(f"{api.url}/openapi.json").json()["components"]["schemas"]
    assert schema["ChatCompletionRequest"]["properties"]["model"]["enum"] == ids


def test_chat_with_adapter_equals_local_peft_and_base_equals_base(client, tokenizer, peft_references):
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    expected = {name: expected_text(peft_references[name], tokenizer, ids, 16) for name in ("tone-a", "tone-b", None)}
    assert len(set(expected.values())) == 3  # each adapter changes the answer: the checks below can fail
    for name in ("tone-a", "tone-b", None):
        model = f"{NAME}:{name}" if name else NAME
        kwargs = dict(model=model, messages=MESSAGES, max_tokens=16, temperature=0)
        out = client.chat.completions.create(**kwargs)
        assert out.choices[0].message.content == expected[name], name
        assert out.model == model
        streamed = client.chat.completions.create(**kwargs, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected[name], name


def test_completion_with_adapter_equals_local_peft(client, tokenizer, peft_references):
    ids = tokenizer("The sea is", return_tensors="pt").input_ids
    out = client.completions.create(model=f"{NAME}:tone-a", prompt="The sea is", max_tokens=12, temperature=0)
    assert out.choices[0].text == expected_text(peft_references["tone-a"], tokenizer, ids, 12)


def test_unknown_adapter_is_404_naming_it(client):
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=f"{NAME}:nope", messages=MESSAGES, max_tokens=4, stream=stream)
        assert e.value.code == "model_not_found" and e.value.param == "model"
        assert "'nope'" in e.value.message and "/v1/models" in e.value.message
    with pytest.raises(openai.NotFoundError, match="'nope'"):
        client.completions.create(model=f"{NAME}:nope", prompt="Hi", max_tokens=4)
