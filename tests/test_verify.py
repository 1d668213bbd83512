"""Unit tier: verification (--verify) against dishonest in-memory nodes (tests/helpers/dishonest_node.py)
running the real span backend. A liar with an honest replica is caught, named and routed around, and the output is
exactly the all-honest one; without a way to decide, the client refuses instead of answering wrongly."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from dishonest_node import MODES
from greedy import new_greedy_tokens
from transformers import AutoModelForCausalLM
from verify_nodes import WINDOW, honest, liar, model_over, named

from torchnode.client.model import AsyncDistributedModel
from torchnode.client.precision import dtype_tolerance as tolerance
from torchnode.client.sampling import SamplingParams
from torchnode.client.verification.verifier import VerificationError, first_mismatch

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300, 12]])
NEW = 24


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    return new_greedy_tokens(tiny_llama, PROMPT, NEW)


async def generate(model: AsyncDistributedModel, on_token=None, on_session=None, **sampling) -> list[int]:
    tokens = []
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True, **sampling)
    session = await model.open_session(PROMPT.shape[1] + NEW)
    if on_session is not None:
        on_session(session)
    try:
        async for new in model.generate_ids(PROMPT, params, session):
            tokens.append(int(new[0]))
            if on_token is not None:
                on_token(session, len(tokens))
    finally:
        await session.close()
    return tokens


def test_tolerance_follows_the_coarsest_dtype():
    """The README's figures: float32 1.04e-4, float16 0.031, bfloat16 0.25; a mix takes the coarsest."""
    assert tolerance(torch.float32) == pytest.approx(1.04e-4, rel=0.01)
    assert tolerance(torch.float16) == pytest.approx(0.031, rel=0.02)
    assert tolerance(torch.bfloat16) == pytest.approx(0.25, rel=0.01)
    assert tolerance(torch.float32, torch.bfloat16, torch.float16) == tolerance(torch.bfloat16)
    x = torch.randn(1, 4, 64)
    assert first_mismatch(x * (1 + 1e-6), x, tolerance(torch.float32)) == (None, pytest.approx(1e-6, rel=0.1, abs=1e-6))
    y = x.clone()
    y[0, 2, 5] += 1.0
    assert first_mismatch(y, x, tolerance(torch.float32))[0] == 2
    y[0, 1, 0] = float("nan")
    assert first_mismatch(y, x, tolerance(torch.float32))[0] == 1


@pytest.mark.parametrize("mode", MODES)
async def test_liar_with_an_honest_replica_is_caught_and_the_output_is_honest(
    ckpt, memory_pool, expected, mode, caplog
):
    honest(memory_pool, ckpt, 0, 2, "a:1")
    bad = liar(memory_pool, ckpt, 2, 4, "b:1", mode)
    honest(memory_pool, ckpt, 2, 4, "c:1")
    unverified = await generate(model_over(ckpt, memory_pool, verify=False))
    assert unverified != expected, "the liar must change the output when nobody checks"
    lies_unchecked = bad.backend.lies

    model = model_over(ckpt, memory_pool)
    sessions, caught = [], []  # (first wrong position, the session's position when it was decided)
    model.caught = lambda finding, report=model.caught: (
        caught.append((finding.position, sessions[-1].position)),
        report(finding),
    )
    with caplog.at_level(logging.WARNING):
        assert await generate(model, on_session=sessions.append) == expected
    assert bad.backend.lies > lies_unchecked  # it lied again, under verification
    assert named(caplog, bad)
    assert model.dishonest == {bad.address}
    # caught within one window: found wrong at its first lie, decided at the first check after it
    first_lie = bad.backend.lie_positions[lies_unchecked]
    found, decided_at = caught[0]
    assert found == first_lie, f"{mode}: first lie at {first_lie}, first wrong position found {found}"
    assert first_lie < decided_at <= first_lie + WINDOW, f"{mode}: lie at {first_lie} decided at {decided_at}"


async def test_tokens_are_released_only_after_their_window_is_checked(ckpt, memory_pool, expected):
    honest(memory_pool, ckpt, 0, 2, "a:1")
    honest(memory_pool, ckpt, 2, 4, "b:1")
    honest(memory_pool, ckpt, 2, 4, "c:1")
    released_at = []

    def on_token(session, count):  # the token at index T + count - 1 came from the output at T + count - 2
        released_at.append((PROMPT.shape[1] + count - 2, session.verifier.verified))

    assert await generate(model_over(ckpt, memory_pool), on_token) == expected
    assert all(position < verified for position, verified in released_at)
    windows = [
        s.positions
        for n in memory_pool
        for s in n.sessions
        if WINDOW in {b - a for a, b in itertools.pairwise(s.positions)}
    ]
    assert windows, "each check is an ordinary session on another node, stepping a window at a time"


async def test_sampling_with_a_seed_equals_the_honest_run(ckpt, memory_pool, caplog):
    honest(memory_pool, ckpt, 0, 2, "a:1")
    honest(memory_pool, ckpt, 2, 4, "c:1")
    reference = await generate(model_over(ckpt, memory_pool), temperature=0.9, seed=3)
    bad = liar(memory_pool, ckpt, 2, 4, "b:1", "decode")
    model = model_over(ckpt, memory_pool)
    with caplog.at_level(logging.WARNING):
        assert await generate(model, temperature=0.9, seed=3) == reference
    assert bad.backend.lies > 0, "routing never used the liar: this run proves nothing"
    assert named(caplog, bad) and model.dishonest == {bad.address}


async def test_a_third_replica_decides_without_local_weights(ckpt, memory_pool, expected, caplog):
    honest(memory_pool, ckpt, 0, 2, "a:1")
    honest(memory_pool, ckpt, 0, 2, "a:2")
    bad = liar(memory_pool, ckpt, 2, 4, "b:1", "decode")
    honest(memory_pool, ckpt, 2, 4, "c:1")
    honest(memory_pool, ckpt, 2, 4, "d:1")
    with caplog.at_level(logging.WARNING):
        assert await generate(model_over(ckpt, memory_pool, verify_local=False)) == expected
    assert named(caplog, bad)


async def test_a_lying_checker_is_named_and_the_answer_stands(ckpt, memory_pool, expected, caplog):
    honest(memory_pool, ckpt, 0, 2, "a:1")
    honest(memory_pool, ckpt, 2, 4, "c:1", throughput=10_000.0)  # routing puts the honest node in the main chain
    bad = liar(memory_pool, ckpt, 2, 4, "b:1", "random", throughput=1.0)  # so the liar is asked to check it
    bad.backend.mode = "decode"  # checks are prefills: make it lie on those too
    bad.backend._lies = lambda session, x, step: True
    with caplog.at_level(logging.WARNING):
        assert await generate(model_over(ckpt, memory_pool)) == expected
    assert named(caplog, bad)


async def test_a_liar_with_no_honest_replica_is_a_clear_error(ckpt, memory_pool):
    honest(memory_pool, ckpt, 0, 2, "a:1")
    liar(memory_pool, ckpt, 2, 4, "b:1", "decode")
    tokens = []
    with pytest.raises(VerificationError, match="no other node serves them"):
        async for new in model_over(ckpt, memory_pool, verify_local=False).generate_ids(
            PROMPT, SamplingParams(max_new_tokens=NEW, ignore_eos=True)
        ):
            tokens.append(new)
    assert tokens == []  # nothing unverified was released


async def test_two_disagreeing_nodes_and_no_third_opinion_is_a_clear_error(ckpt, memory_pool):
    honest(memory_pool, ckpt, 0, 2, "a:1")
    honest(memory_pool, ckpt, 0, 2, "a:2")
    liar(memory_pool, ckpt, 2, 4, "b:1", "decode")
    honest(memory_pool, ckpt, 2, 4, "c:1")
    with pytest.raises(VerificationError, match="no third opinion"):
        await generate(model_over(ckpt, memory_pool, verify_local=False))


async def test_a_lone_liar_is_caught_by_local_weights_and_then_no_route_is_left(ckpt, memory_pool, caplog):
    from torchnode.client.routing import NoRouteError

    honest(memory_pool, ckpt, 0, 2, "a:1")
    bad = liar(memory_pool, ckpt, 2, 4, "b:1", "decode")
    with caplog.at_level(logging.WARNING), pytest.raises(NoRouteError, match="2:4"):
        await generate(model_over(ckpt, memory_pool))
    assert named(caplog, bad)


async def test_logits_are_verified_too(ckpt, memory_pool, tiny_llama, caplog):
    honest(memory_pool, ckpt, 0, 2, "a:1")
    bad = liar(memory_pool, ckpt, 2, 4, "b:1", "random")
    honest(memory_pool, ckpt, 2, 4, "c:1")
    bad.backend._lies = lambda session, x, step: True
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    model = model_over(ckpt, memory_pool)
    with caplog.at_level(logging.WARNING):
        logits = await model.logits(PROMPT)
    torch.testing.assert_close(logits, hf(PROMPT).logits, atol=1e-4, rtol=1e-4)
    assert bad.backend.lies > 0, "routing never used the liar: this run proves nothing"
    assert named(caplog, bad) and model.dishonest == {bad.address}


# ---- fraud reports in the DHT (protocol/dht/fraud_reports.py, record_validator.FraudReportValidator)


def report_entry(reporter, node_peer_id: str, lifetime: float = 3600.0, **changes):
    """(report, hivemind DHTRecord as DHTNode.store builds it) for a report signed by `reporter`."""
    from dataclasses import replace

    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer
    from hivemind.utils.timed_storage import get_dht_time

    from torchnode.protocol.dht.fraud_reports import FraudReport, encode_report, report_key
    from torchnode.protocol.dht.validator import key_id

    report = FraudReport(
        reporter.peer_id,
        reporter.public_key,
        node_peer_id,
        "127.0.0.1:31330",
        "m",
        0,
        2,
        "ab" * 32,
        get_dht_time() + lifetime,
    )
    report = replace(report, **changes)
    record = DHTRecord(
        key=key_id(report_key(node_peer_id)),
        subkey=MSGPackSerializer.dumps(reporter.peer_id),
        value=MSGPackSerializer.dumps(encode_report(reporter, report)),
        expiration_time=report.expiration,
    )
    return report, record


def test_a_fraud_report_round_trips_and_passes_the_swarm_validator():
    from torchnode.protocol.dht.fraud_reports import decode_report, encode_report, parse_report
    from torchnode.protocol.dht.validator import SwarmValidator
    from torchnode.protocol.wire.identity import Identity

    reporter, node = Identity.generate(), Identity.generate()
    report, record = report_entry(reporter, node.peer_id)
    assert decode_report(encode_report(reporter, report)) == report
    assert SwarmValidator().validate(record)
    assert parse_report(reporter.peer_id, encode_report(reporter, report), node.peer_id) == report
    assert (
        parse_report(reporter.peer_id, encode_report(reporter, report), reporter.peer_id) is None
    )  # another node's key


def test_forged_or_misplaced_fraud_reports_are_refused():
    from dataclasses import replace

    import msgpack
    from hivemind.utils import MSGPackSerializer

    from torchnode.protocol.dht.fraud_reports import decode_report, encode_report
    from torchnode.protocol.dht.records import RecordError, sign_fields
    from torchnode.protocol.dht.validator import FraudReportValidator, SwarmValidator, key_id
    from torchnode.protocol.wire.identity import Identity

    reporter, node, other = Identity.generate(), Identity.generate(), Identity.generate()
    report, record = report_entry(reporter, node.peer_id)
    envelope = msgpack.unpackb(encode_report(reporter, report))
    body = msgpack.unpackb(envelope["record"])
    forged = sign_fields(other, body)  # the reporter's name, someone else's signature
    tampered = msgpack.packb(
        {"record": msgpack.packb(body | {"evidence_sha256": "cd" * 32}), "signature": envelope["signature"]}
    )
    refused = {
        "bad signature": replace(record, value=MSGPackSerializer.dumps(forged)),
        "bad signature ": replace(record, value=MSGPackSerializer.dumps(tampered)),
        "report key": replace(record, key=key_id(f"_torchnode.reports:{other.peer_id}")),  # filed under another node
        "subkey": replace(record, subkey=MSGPackSerializer.dumps(other.peer_id)),
        "expiration": replace(record, expiration_time=record.expiration_time + 60),  # replayed, extended
        "max is": report_entry(reporter, node.peer_id, lifetime=30 * 24 * 3600.0)[1],  # lives too long
    }
    for reason, bad in refused.items():
        assert not SwarmValidator().validate(bad), reason
        with pytest.raises(RecordError, match=reason.strip()):
            FraudReportValidator().check(bad)
    with pytest.raises(RecordError, match="evidence_sha256"):
        encode_report(reporter, replace(report, evidence_sha256="not a hash"))
    with pytest.raises(RecordError, match="own reporter"):
        encode_report(reporter, replace(report, node_peer_id=reporter.peer_id))
    with pytest.raises(RecordError, match="belong to the signing identity"):
        encode_report(other, report)
    with pytest.raises(RecordError, match="bad signature"):
        decode_report(forged)
