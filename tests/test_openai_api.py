"""The OpenAI-compatible API over real nodes, driven by the official `openai` client and by schemathesis."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys

import httpx
import openai
import pytest
import torch
from openai_server import NAME, Api
from swarm import free_port, spawn, start_nodes, stop_all
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

CONTEXT = 256  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def nodes(tiny_llama):
    nodes = start_nodes(str(tiny_llama), ["0:2", "2:4"])
    yield nodes
    stop_all(nodes)


@pytest.fixture(scope="module")
def hf(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def hf_greedy(hf, ids: torch.Tensor, n: int) -> list[int]:
    """New token ids of transformers' greedy decoding (stops after EOS, as the API does)."""
    out = hf[0].generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1] :].tolist()


def sdk_stream(api: Api, prompt, n: int, chat: bool = False) -> str:
    async def run() -> str:
        return "".join([piece async for piece in api.model.stream(prompt, chat, max_new_tokens=n)])

    return api.loop.run(run())


# ---- models


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


# ---- text completions


def test_greedy_completion_equals_transformers_and_sdk(client, api, hf):
    prompt = "Hello there"
    out = greedy(client, prompt, 24)
    ids = hf[1](prompt, return_tensors="pt").input_ids
    new = hf_greedy(hf, ids, 24)
    assert out.choices[0].text == hf[1].decode(new, skip_special_tokens=True) == sdk_stream(api, prompt, 24)
    assert out.usage.prompt_tokens == ids.shape[1]
    assert out.usage.completion_tokens == len(new)
    assert out.usage.total_tokens == ids.shape[1] + len(new)
    assert out.choices[0].finish_reason == ("stop" if new[-1] == hf[1].eos_token_id else "length")
    assert out.object == "text_completion" and out.model == NAME


def greedy(client, prompt, max_tokens: int, **kwargs):
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)


def test_completion_stops_at_max_tokens_with_length(client):
    out = greedy(client, "Once upon a time", 5, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5


def test_streamed_completion_joins_to_the_same_text(client):
    whole = greedy(client, "The quick brown fox", 20)
    chunks = list(greedy(client, "The quick brown fox", 20, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stop_string_ends_completion_and_is_left_out(client):
    text = greedy(client, "Hello there", 24, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[6:9]
    out = greedy(client, "Hello there", 24, stop=[stop], extra_body={"ignore_eos": True})
    assert out.choices[0].text == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_token_id_prompts_batches_and_echo(client, hf):
    prompts = ["The sky", "Once"]
    batch = greedy(client, prompts, 8)
    alone = [greedy(client, p, 8) for p in prompts]
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.total_tokens == sum(a.usage.total_tokens for a in alone)
    streamed = ["", ""]
    for chunk in greedy(client, prompts, 8, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [c.text for c in batch.choices]
    ids = hf[1]("The sky").input_ids
    assert greedy(client, ids, 8).choices[0].text == alone[0].choices[0].text
    echoed = greedy(client, "The sky", 8, echo=True)
    assert echoed.choices[0].text == "The sky" + alone[0].choices[0].text


def test_zero_max_tokens_echoes_the_prompt_only(client):
    out = greedy(client, "The sky", 0, echo=True)
    assert (out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens) == ("The sky", "length", 0)


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=NAME, prompt="Hello", max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


# ---- chat


def test_greedy_chat_equals_transformers_and_sdk(client, api, hf):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    text = hf[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = hf[1](text, add_special_tokens=False, return_tensors="pt").input_ids
    new = hf_greedy(hf, ids, 24)
    message = out.choices[0].message
    assert message.role == "assistant"
    assert message.content == hf[1].decode(new, skip_special_tokens=True) == sdk_stream(api, messages, 24)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (ids.shape[1], len(new))
    assert out.choices[0].finish_reason == ("stop" if new[-1] == hf[1].eos_token_id else "length")
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")


def test_streamed_chat_has_role_content_finish_and_usage(client):
    messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And then?"},
    ]
    kwargs = dict(model=NAME, messages=messages, max_completion_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage and all(c.usage is None for c in chunks[:-1])


def test_concurrent_requests_each_get_their_own_session(api, client):
    prompts = ["The sky", "A quick brown fox jumps", "Once", "Hello there"]
    alone = [greedy(client, p, 10).choices[0].text for p in prompts]

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="none", max_retries=0) as aclient:
            outs = await asyncio.gather(
                *(aclient.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0) for p in prompts)
            )
        return [o.choices[0].text for o in outs]

    assert asyncio.run(together()) == alone


def test_sixteen_concurrent_chats_each_equal_their_answer_alone(api, client):
    """The nodes batch the 16 sessions' steps (different prompt lengths, streamed and not): no answer changes."""
    questions = [f"Question {i}: what is {'very ' * (i % 5)}interesting about the number {i}?" for i in range(16)]

    def request(i: int) -> dict:
        return dict(
            model=NAME,
            messages=[{"role": "user", "content": questions[i]}],
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )

    alone = [client.chat.completions.create(**request(i)).choices[0].message.content for i in range(16)]

    async def one(aclient: openai.AsyncOpenAI, i: int) -> str:
        if i % 2:  # half of them streamed
            stream = await aclient.chat.completions.create(**request(i), stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return (await aclient.chat.completions.create(**request(i))).choices[0].message.content

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="none", max_retries=0, timeout=120) as aclient:
            return list(await asyncio.gather(*(one(aclient, i) for i in range(16))))

    assert asyncio.run(together()) == alone


def test_a_client_leaving_mid_stream_disturbs_nothing(client):
    stream = greedy(client, "Once", 200, stream=True, extra_body={"ignore_eos": True})
    for _ in itertools.islice(stream, 3):
        pass
    stream.close()
    assert greedy(client, "Once", 4, extra_body={"ignore_eos": True}).usage.completion_tokens == 4


# ---- errors


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message


def test_n_above_one_is_refused_clearly(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], n=2)
    assert e.value.param == "n" and "only n=1 is supported" in e.value.message


def test_max_tokens_beyond_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="Hello", max_tokens=CONTEXT)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello " * CONTEXT}])
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"


def test_validation_errors_have_openai_shape(api):
    with httpx.Client(base_url=api.url) as http:
        hi = [{"role": "user", "content": "Hi"}]
        r = http.post("/v1/chat/completions", json={"model": NAME, "messages": hi, "temperature": 5})
        assert r.status_code == 400 and error_of(r)["param"] == "temperature"
        r = http.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "robot", "content": "Hi"}]})
        assert r.status_code == 400 and error_of(r)["param"] == "messages[0].role"
        r = http.post("/v1/completions", json={"model": NAME})
        assert r.status_code == 400 and error_of(r)["param"] == "prompt" and error_of(r)["code"] == "missing"
        r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
        r = http.post("/v1/completions", json={"model": NAME, "prompt": [[1, 99999]]})
        assert r.status_code == 400 and "vocabulary" in error_of(r)["message"]
        r = http.post("/v1/completions", json={"model": NAME, "prompt": ""})
        assert r.status_code == 400 and error_of(r)["message"].startswith(
            "prompt: String should have at least 1 character"
        )
        r = http.get("/v1/nothing")
        assert r.status_code == 404 and error_of(r)["message"] == "Invalid URL (GET /v1/nothing)"
        r = http.get("/v1/chat/completions")
        assert r.status_code == 405 and error_of(r)


def test_no_live_node_is_503(tiny_llama):
    class Gone:
        address = f"127.0.0.1:{free_port()}"

    api = Api(tiny_llama, [Gone()])
    try:
        for stream in (False, True):
            body = {"model": NAME, "prompt": "Hi", "stream": stream}
            r = httpx.post(f"{api.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 503 and error_of(r)["code"] == "swarm_unavailable"
    finally:
        api.close()


def test_openapi_schema_declares_openai_errors(api):
    schema = httpx.get(f"{api.url}/openapi.json").json()
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions"} <= set(schema["paths"])
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in responses
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert fields["model"]["enum"] == [NAME] and fields["n"]["maximum"] == 1


def test_schemathesis_finds_no_server_error(api, tmp_path):
    """Examples, boundary values (the coverage phase) and random requests from the OpenAPI schema: never a 5xx.

    A second app over the same model allows 24 tokens of context, so that every accepted request is short.
    """
    url = api.serve(context_length=24)
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "schemathesis"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "30",
        "--phases",
        "examples,coverage,fuzzing",
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--no-color",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


# ---- the runner behind `torchnode api`


def test_run_api_serves_until_sigint(tiny_llama, nodes):
    script = (
        "import asyncio, sys\n"
        "from torchnode.api import run_api\n"
        "status = lambda m: print('api', m, flush=True)\n"
        "asyncio.run(run_api(sys.argv[1], peers=sys.argv[2].split(','), port=0, on_status=status))\n"
    )
    proc = spawn([sys.executable, "-c", script, str(tiny_llama), ",".join(n.address for n in nodes)], 0, None)
    try:
        url = proc.wait_for(r"ready: OpenAI API at (http://\S+)/v1", 120)[1]
        models = httpx.get(f"{url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == [str(tiny_llama)]
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(30) == 0, proc.log
    finally:
        proc.stop()
