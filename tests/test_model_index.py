"""The model index: entries, their validator, the announcer's entry, the monitor's history, and a real
hivemind DHT on 127.0.0.1 (`dht_peers`: two server peers and a client) that stores and finds entries."""

from __future__ import annotations

import time
from functools import partial

import msgpack
import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from torchnode.coordinator.health_monitor import build_model_state
from torchnode.coordinator.history import History
from torchnode.coordinator.state_schema import NodeState
from torchnode.node.announcer import Announcer
from torchnode.protocol.dht.model_index import (
    INDEX_KEY,
    ModelEntry,
    announce_model,
    decode_entry,
    encode_entry,
    find_models,
    group_by_model,
)
from torchnode.protocol.dht.network import announce
from torchnode.protocol.dht.records import RecordError, ServerRecord, block_key, encode_record
from torchnode.protocol.dht.validator import SwarmValidator, key_id
from torchnode.protocol.wire.identity import Identity


def make_entry(identity: Identity, model="org/tiny", total_blocks=4, lifetime=30.0, **kw) -> ModelEntry:
    fields = dict(
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        model=model,
        revision="abc123",
        family="llama",
        total_blocks=total_blocks,
        adapters=(),
        expiration=get_dht_time() + lifetime,
    )
    return ModelEntry(**(fields | kw))


def dht_record(entry_value: bytes, subkey: str, expiration: float, key: str = INDEX_KEY) -> DHTRecord:
    """What hivemind hands a validator for `store(key, value, expiration, subkey=subkey)`."""
    return DHTRecord(key_id(key), MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(entry_value), expiration)


def sign_raw(signer: Identity, fields: dict) -> bytes:
    body = msgpack.packb(fields, use_bin_type=True)
    return msgpack.packb({"record": body, "signature": signer.sign(body)}, use_bin_type=True)


def test_entry_round_trip_and_tampering():
    me = Identity.generate()
    entry = make_entry(me, adapters=("org/lora-a",))
    value = encode_entry(me, entry)
    assert decode_entry(value) == entry
    tampered = bytearray(value)
    tampered[value.index(b"llama")] ^= 1  # flip one bit of the signed family
    with pytest.raises(RecordError, match="signature|family"):
        decode_entry(bytes(tampered))
    with pytest.raises(RecordError, match="signing identity"):
        encode_entry(Identity.generate(), entry)


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(family="Llama 2"), "family"),
        (dict(total_blocks=0), "total_blocks"),
        (dict(total_blocks=5000), "total_blocks"),
        (dict(model="bad name"), "model name"),
        (dict(adapters=["ok"] * 40), "adapters"),
        (dict(adapters=["../x"]), "adapter name"),
        (dict(expiration=float("nan")), "expiration"),
    ],
)
def test_malformed_entries_are_refused_with_a_reason(change, words):
    me = Identity.generate()
    fields = dict(vars(make_entry(me))) | {"adapters": []}
    with pytest.raises(RecordError, match=words):
        decode_entry(sign_raw(me, fields | change))


def test_validator_takes_only_signed_entries_under_the_index_key():
    validator = SwarmValidator()
    me, other = Identity.generate(), Identity.generate()
    entry = make_entry(me)
    value = encode_entry(me, entry)
    assert validator.validate(dht_record(value, me.peer_id, entry.expiration))
    assert not validator.validate(dht_record(value, other.peer_id, entry.expiration))  # someone else's subkey
    assert not validator.validate(dht_record(value, me.peer_id, entry.expiration + 5))  # extended expiration
    assert not validator.validate(dht_record(value, me.peer_id, entry.expiration, key=block_key("org/tiny", 0)))
    far = make_entry(me, lifetime=1000)
    assert not validator.validate(dht_record(encode_entry(me, far), me.peer_id, far.expiration))  # too long-lived
    server = ServerRecord(
        peer_id=me.peer_id,
        public_key=me.public_key,
        address="127.0.0.1:1",
        model="org/tiny",
        revision="r",
        start=0,
        end=1,
        state="online",
        throughput=1.0,
        cache_bytes_free=0,
        version="0.1.0",
        expiration=entry.expiration,
    )
    server_value = encode_record(me, server)
    assert not validator.validate(dht_record(server_value, me.peer_id, entry.expiration))  # a server record here
    assert validator.validate(dht_record(server_value, me.peer_id, entry.expiration, key=block_key("org/tiny", 0)))


def test_group_by_model_votes_the_block_count():
    a, b, c = (Identity.generate() for _ in range(3))
    entries = [
        make_entry(a, total_blocks=30),
        make_entry(b, total_blocks=30),
        make_entry(c, total_blocks=999),
        make_entry(a, model="other", family="qwen2", total_blocks=8),
    ]
    index = group_by_model(entries)
    assert list(index) == ["org/tiny", "other"]
    assert index["org/tiny"].total_blocks == 30 and index["other"].families == ["qwen2"]
    assert len(index["org/tiny"].entries) == 3


def test_announcer_entry_matches_its_record():
    me = Identity.generate()
    record = ServerRecord(
        peer_id=me.peer_id,
        public_key=me.public_key,
        address="127.0.0.1:1",
        model="org/tiny",
        revision="r1",
        start=0,
        end=2,
        state="online",
        throughput=1.0,
        cache_bytes_free=0,
        version="0.1.0",
        expiration=123.0,
        total_blocks=4,
    )
    entry = Announcer(None, me, lambda: record, family="llama").entry(record)
    assert (entry.model, entry.revision, entry.family, entry.total_blocks, entry.adapters, entry.expiration) == (
        "org/tiny",
        "r1",
        "llama",
        4,
        (),
        123.0,
    )


def node_state(peer: str, health="healthy", tps=10.0) -> NodeState:
    return NodeState(
        peer_id=peer,
        short_id=peer[:12],
        public_key="00" * 32,
        address="127.0.0.1:1",
        model="m",
        revision="r1",
        start=0,
        end=4,
        state="online",
        health=health,
        throughput=tps,
        rtt_ms=1.0,
        cache_bytes_free=1,
        sessions_free=3,
        version="0.1.0",
        total_blocks=4,
        first_seen=0.0,
        uptime_s=1.0,
        expires_in_s=5.0,
    )


def test_history_keeps_the_window_and_forgets_what_left():
    history = History(window=60)
    both = build_model_state("m", 4, True, [node_state("a" * 32, tps=5.0), node_state("b" * 32, tps=7.0)])
    history.record([both], now=1000.0)
    one = build_model_state("m", 4, True, [node_state("a" * 32, tps=5.0), node_state("b" * 32, health="unhealthy")])
    history.record([one], now=1030.0)
    samples = history.model("m")
    assert [(s.nodes, s.nodes_online, s.blocks_covered, s.tokens_per_s, s.sessions_free) for s in samples] == [
        (2, 2, 4, 12.0, 6),
        (2, 1, 4, 5.0, 3),
    ]
    assert [s.health for s in history.node("b" * 32)] == ["healthy", "unhealthy"]
    history.record([build_model_state("m", 4, True, [node_state("a" * 32)])], now=1070.0)
    assert [s.t for s in history.model("m")] == [1030.0, 1070.0]  # older than the window: dropped
    history.record([build_model_state("m", 4, True, [node_state("a" * 32)])], now=1095.0)
    assert history.node("b" * 32) == [] and history.recent_models() == ["m"]
    with pytest.raises(ValueError):
        History(window=0)


# --- a real DHT on 127.0.0.1 ---------------------------------------------------------------------------


@pytest.mark.swarm
def test_entries_are_stored_found_and_expire(dht_peers):
    a, b = Identity.generate(), Identity.generate()
    assert announce_model(dht_peers[0], a, make_entry(a))
    assert announce_model(dht_peers[1], b, make_entry(b, model="org/other", family="qwen2", lifetime=3))
    found = {e.peer_id: e for e in find_models(dht_peers[2])}
    assert {p: (e.model, e.family) for p, e in found.items()} == {
        a.peer_id: ("org/tiny", "llama"),
        b.peer_id: ("org/other", "qwen2"),
    }
    # a forged entry (b's entry stored under a's subkey) never gets in: the validator refuses the store
    forged = encode_entry(b, make_entry(b))
    stored = dht_peers[2].run_coroutine(_raw_store(INDEX_KEY, forged, a.peer_id, get_dht_time() + 30))
    assert not stored
    # a server record announced alongside does not disturb the index
    record = ServerRecord(
        peer_id=a.peer_id,
        public_key=a.public_key,
        address="127.0.0.1:1",
        model="org/tiny",
        revision="abc123",
        start=0,
        end=2,
        state="online",
        throughput=1.0,
        cache_bytes_free=0,
        version="0.1.0",
        expiration=get_dht_time() + 30,
        total_blocks=4,
    )
    assert all(announce(dht_peers[0], a, record).values())
    time.sleep(3.5)  # b's entry expires
    assert [(e.peer_id, e.model) for e in find_models(dht_peers[2])] == [(a.peer_id, "org/tiny")]


async def _raw_store_in_dht(_dht, node, key: str, value: bytes, subkey: str, expiration: float) -> bool:
    return bool(await node.store(key, value, expiration, subkey=subkey))


def _raw_store(key: str, value: bytes, subkey: str, expiration: float):
    """A store that skips announce_model's checks (runs in the DHT process: module-level, picklable)."""
    return partial(_raw_store_in_dht, key=key, value=value, subkey=subkey, expiration=expiration)
