"""LoRA adapters served per request: token-exact with a local `peft` model, per-sequence in one batch,
the base model unchanged without one, and clear errors for bad adapters.

Unit tier: in-memory nodes (the real span backend). Process tier: nodes started by the CLI with
--adapters, real gRPC on loopback, two sessions with different adapters at once on the same nodes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from greedy import local_greedy
from lora_models import peft_model
from memory_node import MemoryNode, MemoryPeers
from swarm import run_cli, start_nodes, stop_all
from transformers import AutoModelForCausalLM, AutoTokenizer

from torchnode.client.model import AsyncDistributedModel
from torchnode.client.routing import NoRouteError
from torchnode.client.sync_model import DistributedModel
from torchnode.models.checkpoint import resolve
from torchnode.models.families import load_span
from torchnode.models.lora import TARGETS, AdapterBank, AdapterError, find_adapter, lora_pass
from torchnode.protocol.wire.node_client import NodeError

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

PROMPT = torch.tensor([[5, 80, 17, 300, 42, 9, 121]])


@pytest.fixture(scope="module")
def memory_nodes(tiny_llama, adapters):
    ckpt = resolve(str(tiny_llama))
    served = [str(p) for p in adapters.values()]
    nodes = [MemoryNode(ckpt, 0, 2, "mem-a", adapters=served), MemoryNode(ckpt, 2, 4, "mem-b", adapters=served)]
    yield ckpt, nodes
    for n in nodes:
        n.shutdown()


# ---- unit tier


def test_logits_and_greedy_equal_local_peft(memory_nodes, peft_references):
    ckpt, nodes = memory_nodes
    model = AsyncDistributedModel(ckpt, MemoryPeers(nodes))

    async def run():
        for name in ("tone-a", "tone-b", None):
            logits = await model.logits(PROMPT, adapter=name)
            with torch.no_grad():
                expected = peft_references[name](input_ids=PROMPT).logits
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
            out = await model.generate(PROMPT, adapter=name, max_new_tokens=12)
            assert out[0].tolist() == local_greedy(peft_references[name], PROMPT, 12), name

    asyncio.run(run())
    # the adapters matter: each changes the greedy continuation, so the checks above can fail
    greedy = {k: local_greedy(m, PROMPT, 12) for k, m in peft_references.items()}
    assert len({tuple(v) for v in greedy.values()}) == 3


def test_mixed_adapters_in_one_packed_pass_equal_each_alone(tiny_llama, adapters):
    """Per-sequence LoRA: three sequences (adapter a, none, adapter b) in one forward_batch."""
    ckpt = resolve(str(tiny_llama))
    span = load_span(ckpt, 0, 4)
    bank = AdapterBank(span, 0, 4, [find_adapter(str(p)) for p in adapters.values()])
    torch.manual_seed(0)
    xs = [torch.randn(1, 5, 64), torch.randn(2, 3, 64), torch.randn(1, 4, 64)]
    loras = [bank.get("tone-a"), None, bank.get("tone-b")]
    with lora_pass([x.shape[0] * x.shape[1] for x in xs], loras):
        together = span.forward_batch(xs, [0, 0, 0], 0, 4, [None, None, None])
    for x, lora, out in zip(xs, loras, together, strict=True):
        with lora_pass([x.numel() // 64], [lora]):
            alone = span(x, 0, 0, 4)
        # fp32 matmuls over a different number of rows round differently (as for the base model's batches)
        torch.testing.assert_close(out, alone, rtol=0, atol=1e-4)
    base = [span(x, 0, 0, 4) for x in xs]  # outside lora_pass: the base span, hooks or not
    assert torch.equal(base[1], span(xs[1], 0, 0, 4)) and (base[1] - together[1]).abs().max() < 1e-4
    assert (base[0] - together[0]).abs().max() > 1e-2 and (base[2] - together[2]).abs().max() > 1e-2


def test_unknown_adapter_is_refused_with_its_name(memory_nodes):
    ckpt, nodes = memory_nodes
    with pytest.raises(NodeError, match="'nope' is not served"):
        asyncio.run(nodes[0].open_session(_spec("nope")).step(torch.zeros(1, 1, 64), 0, 5.0))
    model = AsyncDistributedModel(ckpt, MemoryPeers(nodes))
    with pytest.raises(NoRouteError):  # routing uses only nodes that serve it: none do
        asyncio.run(model.logits(PROMPT, adapter="nope"))


def _spec(adapter: str):
    from torchnode.protocol.wire.node_client import SessionSpec

    return SessionSpec("s-unknown", 0, 2, 8, adapter=adapter)


def test_bad_adapters_fail_with_clear_errors(tiny_llama, adapters, tmp_path):
    ckpt = resolve(str(tiny_llama))
    span = load_span(ckpt, 0, 2)
    with pytest.raises(AdapterError, match="no such directory"):
        find_adapter(str(tmp_path / "missing"))
    corrupt = shutil.copytree(adapters["tone-a"], tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(AdapterError, match="'corrupt'.*corrupt"):
        find_adapter(str(corrupt))
    other = AutoModelForCausalLM.from_config(
        AutoModelForCausalLM.from_pretrained(tiny_llama).config.__class__(
            **{**json.loads((tiny_llama / "config.json").read_text()), "hidden_size": 32, "head_dim": 8}
        )
    )
    wide = tmp_path / "other-model"
    peft.get_peft_model(
        other, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    ).save_pretrained(wide)
    with pytest.raises(AdapterError, match="'other-model': shapes do not fit layers.0.self_attn.q_proj"):
        AdapterBank(span, 0, 2, [find_adapter(str(wide))])
    dora = shutil.copytree(adapters["tone-a"], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text()) | {"use_dora": True}
    (dora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="use_dora is not supported"):
        find_adapter(str(dora))


def test_node_loads_only_its_span_tensors(tiny_llama, adapters):
    ckpt = resolve(str(tiny_llama))
    bank = AdapterBank(load_span(ckpt, 2, 4), 2, 4, [find_adapter(str(adapters["tone-a"]))])
    layers = {path.split(".")[1] for path in bank.get("tone-a")}
    assert layers == {"2", "3"} and len(bank.get("tone-a")) == 2 * len(TARGETS)


# ---- fine-tuning through the swarm (client/finetune.py)

GRAD_TOLERANCE = 0.0  # gradients vs a local peft model (fp32, CPU): equal to the last bit, as the README says


def sync_model(ckpt, nodes) -> DistributedModel:
    from torchnode.client.loop_thread import LoopThread

    loop = LoopThread()

    async def make():
        return AsyncDistributedModel(ckpt, MemoryPeers(nodes), step_timeout=5.0)

    return DistributedModel(loop.run(make()), loop)


def random_lora(model: DistributedModel, seed: int = 0):
    from torchnode.client.finetune import DistributedLoraModel

    torch.manual_seed(seed)
    tuned = DistributedLoraModel(model, r=4, alpha=8)
    with torch.no_grad():
        for p in tuned.parameters():
            p.normal_(0, 0.1)  # B too (PEFT starts it at zero): every gradient is then nonzero
    return tuned


def assert_grads_equal_peft(base: Path, tuned, ids: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
    local = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False),
    )
    params = dict(local.named_parameters())
    with torch.no_grad():
        for name, key in tuned.lora.names.items():
            params[f"base_model.model.model.{name}.default.weight"].copy_(tuned.lora.weights[key])
    expected = local(input_ids=ids, labels=labels).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=GRAD_TOLERANCE)
    for name, key in tuned.lora.names.items():
        got, want = tuned.lora.weights[key].grad, params[f"base_model.model.model.{name}.default.weight"].grad
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=0, atol=GRAD_TOLERANCE, msg=name)


def training_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100  # prompt tokens left out of the loss
    return ids, labels


def test_gradients_equal_local_peft_with_failover_mid_step(tiny_llama):
    ckpt = resolve(str(tiny_llama))
    nodes = [
        MemoryNode(ckpt, 0, 2, "m0", throughput=200.0),
        MemoryNode(ckpt, 2, 4, "m1"),
        MemoryNode(ckpt, 0, 2, "m2", throughput=1.0),
    ]
    model = sync_model(ckpt, nodes)
    try:
        tuned = random_lora(model)
        ids, labels = training_batch()
        loss, _ = tuned(ids, labels)
        nodes[0].down = True  # the node of blocks 0:2 dies between the forward and the backward pass
        loss.backward()  # its Backward is redone on the replica
        assert_grads_equal_peft(tiny_llama, tuned, ids, labels, loss)
        assert "m0" in model.async_model.bans.banned()
    finally:
        model.close()
        for n in nodes:
            n.shutdown()


@pytest.fixture(scope="module")
def tuned_adapter(tiny_llama, tmp_path_factory) -> tuple[Path, list[float]]:
    """A LoRA trained through two in-memory nodes on a tiny repeated text until the loss falls; saved as PEFT."""
    from torchnode.client.finetune import DistributedLoraModel

    ckpt = resolve(str(tiny_llama))
    nodes = [MemoryNode(ckpt, 0, 2, "t0"), MemoryNode(ckpt, 2, 4, "t1")]
    model = sync_model(ckpt, nodes)
    try:
        torch.manual_seed(0)
        tuned = DistributedLoraModel(model, r=4, alpha=8)
        optimizer = torch.optim.AdamW(tuned.parameters(), lr=2e-2)
        ids = model.tokenizer(["the cat sat on the mat. the cat sat on the mat."], return_tensors="pt").input_ids
        losses = []
        for _ in range(6):
            loss, _ = tuned(ids, ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return tuned.save_pretrained(tmp_path_factory.mktemp("tuned") / "tuned"), losses
    finally:
        model.close()
        for n in nodes:
            n.shutdown()


def test_training_lowers_the_loss(tuned_adapter):
    _, losses = tuned_adapter
    assert losses[-1] < 0.8 * losses[0], losses


# ---- process tier


@pytest.fixture(scope="module")
def adapter_nodes(tiny_llama, adapters, tuned_adapter):
    served = ",".join(str(p) for p in [*adapters.values(), tuned_adapter[0]])
    nodes = start_nodes(str(tiny_llama), ["0:2", "2:4"], "--adapters", served)
    yield nodes
    stop_all(nodes)


def test_swarm_sessions_with_different_adapters_at_once(tiny_llama, adapter_nodes, peft_references):
    with DistributedModel.from_pretrained(str(tiny_llama), peers=[n.address for n in adapter_nodes]) as model:
        hops = model.run(model.async_model.route(adapter="tone-b"))
        assert len(hops) == 2
        info = model.run(hops[0].node.info())
        assert set(info.adapters) == {"tone-a", "tone-b", "tuned"}

        async def together():
            core = model.async_model
            return await asyncio.gather(
                *(core.generate(PROMPT, adapter=name, max_new_tokens=16) for name in ("tone-a", "tone-b", None))
            )

        outs = model.run(together())
        for name, out in zip(("tone-a", "tone-b", None), outs, strict=True):
            assert out[0].tolist() == local_greedy(peft_references[name], PROMPT, 16), name
        with model.session(max_length=64, adapter="tone-a") as chat:  # sessions keep their adapter across turns
            first = chat.generate(PROMPT, max_new_tokens=6)
            assert first[0].tolist() == local_greedy(peft_references["tone-a"], PROMPT, 6)


def test_cli_generate_with_adapter_and_bad_adapter(tiny_llama, adapter_nodes, peft_references):
    peers = ",".join(n.address for n in adapter_nodes)
    good = run_cli(
        "generate", str(tiny_llama), "Hello", "--peers", peers, "--adapter", "tone-a", "--max-new-tokens", "8"
    )
    assert good.returncode == 0, good.stderr
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    expected = tokenizer.decode(
        local_greedy(peft_references["tone-a"], ids, 8)[ids.shape[1] :], skip_special_tokens=True
    )
    base = tokenizer.decode(local_greedy(peft_references[None], ids, 8)[ids.shape[1] :], skip_special_tokens=True)
    assert good.stdout == expected + "\n" and expected != base
    bad = run_cli("generate", str(tiny_llama), "Hello", "--peers", peers, "--adapter", "nope", "--max-new-tokens", "4")
    assert bad.returncode == 1 and "nope" in bad.stderr


def test_join_refuses_a_bad_adapter_naming_the_flag(tiny_llama, tmp_path):
    result = run_cli("join", str(tiny_llama), "--adapters", str(tmp_path / "missing"), timeout=60)
    assert result.returncode == 2 and "--adapters" in result.stderr and "missing" in result.stderr


def test_server_record_carries_adapters():
    from torchnode.protocol.dht.records import RecordError, ServerRecord, decode_record, encode_record, sign_fields
    from torchnode.protocol.wire.identity import Identity

    identity = Identity.generate()
    record = ServerRecord(
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        address="127.0.0.1:5000",
        model="m",
        revision="r",
        start=0,
        end=2,
        state="online",
        throughput=1.0,
        cache_bytes_free=1,
        version="0",
        expiration=1.0,
        adapters=("tone-a", "owner/tone-b"),
    )
    assert decode_record(encode_record(identity, record)) == record
    fields = {k: v for k, v in record.__dict__.items() if k != "adapters"} | {"dht_maddrs": []}
    assert decode_record(sign_fields(identity, fields)).adapters == ()  # older nodes' records: no adapters
    with pytest.raises(RecordError, match="adapter name"):
        decode_record(sign_fields(identity, fields | {"adapters": ["has space"]}))


def test_trained_adapter_served_by_swarm_and_backward_over_grpc(tiny_llama, adapter_nodes, tuned_adapter):
    """The round trip: the adapter trained through the swarm is served with --adapters and gives the local
    tuned model's greedy tokens; a training step over real gRPC nodes has peft's gradients."""
    with DistributedModel.from_pretrained(str(tiny_llama), peers=[n.address for n in adapter_nodes]) as model:
        out = model.generate(PROMPT, adapter="tuned", max_new_tokens=12)
        assert out[0].tolist() == local_greedy(peft_model(tiny_llama, tuned_adapter[0]), PROMPT, 12)
        tuned = random_lora(model, seed=3)
        ids, labels = training_batch()
        loss, _ = tuned(ids, labels)
        loss.backward()
        assert_grads_equal_peft(tiny_llama, tuned, ids, labels, loss)
