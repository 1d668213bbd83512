"""Unit tier: --verify on sessions with a LoRA adapter (client/verification/verifier.py and evidence.py).

Checks must run the same adapter as the checked node, else they compare two different models: checker
nodes are sessions naming the adapter (only nodes serving it qualify), the client's own check applies the
adapter's LoRA, and a fraud proof is replayed with it. References are a local `peft` model, never our code.
"""

from __future__ import annotations

import logging
import shutil
import types

import pytest
import torch
from greedy import local_greedy
from verify_nodes import honest, liar, model_over, named

from torchnode.client.verification.evidence import EvidenceError, check_evidence, write_evidence
from torchnode.client.verification.verifier import Finding, VerificationError
from torchnode.models.lora import find_adapter
from torchnode.protocol.wire import signing, tensor_codec
from torchnode.protocol.wire import torchnode_pb2 as pb
from torchnode.protocol.wire.identity import Identity

PROMPT = torch.tensor([[5, 80, 17, 300, 42, 9, 121]])
NEW = 16


async def generate(model, adapter: str) -> list[int]:
    return (await model.generate(PROMPT, adapter=adapter, max_new_tokens=NEW))[0].tolist()


def adapter_sessions(node) -> set[str]:
    return {s.spec.adapter for s in node.sessions}


async def test_honest_adapter_swarm_verified_locally_equals_peft(ckpt, memory_pool, adapters, peft_references):
    """The only replicas of each span serve no adapter: they may not check, so the client checks itself,
    with the adapter's LoRA (were it left out, the honest nodes would be accused)."""
    a = honest(memory_pool, ckpt, 0, 2, "a:1", adapters=adapters.values())
    b = honest(memory_pool, ckpt, 2, 4, "b:1", adapters=adapters.values())
    bases = [honest(memory_pool, ckpt, 0, 2, "c:1"), honest(memory_pool, ckpt, 2, 4, "d:1")]
    model = model_over(ckpt, memory_pool)
    assert await generate(model, str(adapters["tone-a"])) == local_greedy(peft_references["tone-a"], PROMPT, NEW)
    assert not model.dishonest
    assert all(not n.sessions for n in bases), "a node without the adapter was asked to check"
    assert adapter_sessions(a) == adapter_sessions(b) == {"tone-a"}  # its directory's base name


async def test_checker_nodes_run_the_session_adapter(ckpt, memory_pool, adapters, peft_references):
    """No local copy of the adapter (named, not given as files): other nodes serving it check."""
    for i in (1, 2):
        honest(memory_pool, ckpt, 0, 2, f"a:{i}", adapters=adapters.values())
        honest(memory_pool, ckpt, 2, 4, f"b:{i}", adapters=adapters.values())
    base = honest(memory_pool, ckpt, 2, 4, "c:1", throughput=10_000.0)  # the fastest: routing would prefer it
    model = model_over(ckpt, memory_pool)
    assert await generate(model, "tone-b") == local_greedy(peft_references["tone-b"], PROMPT, NEW)
    assert not model.dishonest and not base.sessions
    assert all(len(n.sessions) == 1 and adapter_sessions(n) == {"tone-b"} for n in memory_pool if n is not base)


@pytest.mark.parametrize("judge", ["local", "third node"])
async def test_a_liar_on_an_adapter_session_is_caught(ckpt, memory_pool, adapters, peft_references, judge, caplog):
    honest(memory_pool, ckpt, 0, 2, "a:1", adapters=adapters.values())
    bad = liar(memory_pool, ckpt, 2, 4, "b:1", "decode", adapters=adapters.values())
    honest(memory_pool, ckpt, 2, 4, "c:1", adapters=adapters.values())
    base = honest(memory_pool, ckpt, 2, 4, "e:1")
    if judge == "third node":  # no local copy of the adapter: a second replica of each span checks, a third judges
        honest(memory_pool, ckpt, 0, 2, "a:2", adapters=adapters.values())
        honest(memory_pool, ckpt, 2, 4, "d:1", adapters=adapters.values())
    adapter = str(adapters["tone-a"]) if judge == "local" else "tone-a"
    expected = local_greedy(peft_references["tone-a"], PROMPT, NEW)
    assert await generate(model_over(ckpt, memory_pool, verify=False), adapter) != expected  # the lie matters

    model = model_over(ckpt, memory_pool, verify_local=judge == "local")
    findings = []
    model.caught = lambda finding, caught=model.caught: (findings.append(finding), caught(finding))
    with caplog.at_level(logging.WARNING):
        assert await generate(model, adapter) == expected
    assert named(caplog, bad) and model.dishonest == {bad.address}
    assert findings[0].adapter == "tone-a" and findings[0].judge in (
        {"this client"} if judge == "local" else {"c:1", "d:1"}
    )
    assert (findings[0].adapter_files is not None) == (judge == "local")
    assert not base.sessions


async def test_no_opinion_with_the_adapter_is_a_clear_error(ckpt, memory_pool, adapters):
    """The client holds the base weights but not the adapter, and no other node serves it: no check."""
    honest(memory_pool, ckpt, 0, 2, "a:1", adapters=adapters.values())
    honest(memory_pool, ckpt, 2, 4, "b:1", adapters=adapters.values())
    honest(memory_pool, ckpt, 0, 4, "c:1")
    with pytest.raises(VerificationError, match="adapter 'tone-a', which it has no copy of"):
        await generate(model_over(ckpt, memory_pool), "tone-a")


# ---- fraud proofs of adapter sessions


def signed_session(client: Identity, node: Identity, adapter: str, x: torch.Tensor, out: torch.Tensor):
    """One signed step (a prefill of blocks 0:2 naming `adapter`) and the node's signed reply `out`."""
    request = pb.Step(
        session_id="s",
        step=0,
        position=0,
        wire_dtype="float32",
        max_length=32,
        batch_size=1,
        start_block=0,
        end_block=2,
        adapter=adapter,
    )
    request.hidden.CopyFrom(tensor_codec.encode(x, torch.float32))
    signing.sign(client, "Inference", request, audience=node.public_key)
    reply = pb.StepResult(session_id="s", step=0)
    reply.hidden.CopyFrom(tensor_codec.encode(out, torch.float32))
    signing.sign(node, "Inference", reply, in_reply_to=request.auth.signature)
    return request.SerializeToString(), reply.SerializeToString()


def test_evidence_of_an_adapter_session_is_replayed_with_its_adapter(ckpt, adapters, peft_references, tmp_path):
    client, node = Identity.generate(), Identity.generate()
    with torch.no_grad():  # peft's hidden states: [0] enters block 0, [2] leaves block 1
        tuned = peft_references["tone-a"](input_ids=PROMPT, output_hidden_states=True).hidden_states
        base = peft_references[None](input_ids=PROMPT, output_hidden_states=True).hidden_states
    files = find_adapter(str(adapters["tone-a"]))

    def evidence(out: torch.Tensor, position: int):  # positions only keep the file names apart
        finding = Finding(
            types.SimpleNamespace(address="n:1"),
            node.peer_id,
            0,
            2,
            position,
            1.0,
            1e-4,
            "this client",
            node.public_key,
            "float32",
            (signed_session(client, node, "tone-a", tuned[0], out),),
            "tone-a",
            files,
        )
        return write_evidence(finding, ckpt.name, ckpt.revision, client.public_key)

    ignored = evidence(base[2], 0)  # the node skipped the adapter: a lie about an adapter session
    verdict = check_evidence(ignored, ckpt, str(adapters["tone-a"]))
    assert verdict.proven and verdict.position == 0, verdict.message
    honest = evidence(tuned[2], 1)  # right only with the adapter: the replay applies it
    assert not check_evidence(honest, ckpt, str(adapters["tone-a"])).proven

    with pytest.raises(EvidenceError, match="adapter 'tone-a': give its files with --adapter"):
        check_evidence(ignored, ckpt)
    with pytest.raises(EvidenceError, match="is adapter 'tone-b'"):
        check_evidence(ignored, ckpt, str(adapters["tone-b"]))
    impostor = shutil.copytree(adapters["tone-b"], tmp_path / "other" / "tone-a")  # the same name, other weights
    with pytest.raises(EvidenceError, match="other weights"):
        check_evidence(ignored, ckpt, str(impostor))
