"""DHT records: encoding, the validator on hand-built DHTRecords, and a real hivemind swarm on 127.0.0.1.

`dht_peers` (tests/conftest.py) is three peers started by `start_dht` (two servers, one client); `rogue_swarm` adds an
unmodified hivemind peer without our validator, which stores whatever it is told to, between two honest ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import hivemind
import msgpack
import psutil
import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from torchnode.protocol.dht.network import announce, find_servers, start_dht, visible_maddrs
from torchnode.protocol.dht.records import (
    RecordError,
    ServerRecord,
    block_key,
    decode_record,
    encode_record,
    parse_block_key,
    validate_model_name,
)
from torchnode.protocol.dht.validator import ServerRecordValidator, key_id, parse_entry
from torchnode.protocol.wire.identity import Identity

MODEL = "org/tiny-model"
TOTAL_BLOCKS = 4


def make_record(identity: Identity, model: str = MODEL, start: int = 0, end: int = 3, lifetime: float = 30.0, **kw):
    fields = dict(
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        address="127.0.0.1:31337",
        model=model,
        revision="main",
        start=start,
        end=end,
        state="online",
        throughput=12.5,
        cache_bytes_free=1 << 30,
        version="0.1.0",
        expiration=get_dht_time() + lifetime,
        dht_maddrs=("/ip4/127.0.0.1/tcp/4000/p2p/12D3KooWxyz",),
    )
    return ServerRecord(**(fields | kw))


def sign_raw(signer: Identity, fields: dict) -> bytes:
    """An envelope over arbitrary fields, as a malicious peer could build it (no checks)."""
    body = msgpack.packb(fields, use_bin_type=True)
    return msgpack.packb({"record": body, "signature": signer.sign(body)}, use_bin_type=True)


def raw_fields(record: ServerRecord) -> dict:
    fields = dict(record.__dict__)
    fields["dht_maddrs"] = list(record.dht_maddrs)
    return fields


def tamper(value: bytes, **changes) -> bytes:
    """Changes fields of a signed value and keeps the old signature."""
    envelope = msgpack.unpackb(value, raw=False)
    fields = msgpack.unpackb(envelope["record"], raw=False) | changes
    envelope["record"] = msgpack.packb(fields, use_bin_type=True)
    return msgpack.packb(envelope, use_bin_type=True)


# --- keys and records -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt2", "org/name", "Qwen/Qwen2.5-0.5B-Instruct", "a.5", "x_y-z"])
def test_block_key_round_trip(model):
    assert parse_block_key(block_key(model, 17)) == (model, 17)
    assert parse_block_key(block_key(model, 0)) == (model, 0)


@pytest.mark.parametrize(
    "model", ["", " ", "a b", "a\tb", ".a", "a.", "/a", "a/", "a:b", "é", "a\n", "x" * 129, None, 5]
)
def test_malformed_model_names(model):
    with pytest.raises(ValueError):
        validate_model_name(model)


@pytest.mark.parametrize(
    "key", ["model", "model.", "model.-1", "model.01", "model.1a", "model.\u0661", " m.1", "m .1", ".1"]
)
def test_malformed_block_keys(key):
    with pytest.raises(ValueError):
        parse_block_key(key)


def test_block_key_rejects_bad_block():
    for block in (-1, 1.0, True, "1"):
        with pytest.raises(ValueError):
            block_key(MODEL, block)


def test_encode_decode_round_trip():
    identity = Identity.generate()
    record = make_record(identity)
    assert decode_record(encode_record(identity, record)) == record


def test_encode_refuses_foreign_or_invalid_records():
    identity, other = Identity.generate(), Identity.generate()
    with pytest.raises(RecordError, match="signing identity"):
        encode_record(other, make_record(identity))
    with pytest.raises(RecordError, match="state"):
        encode_record(identity, make_record(identity, state="asleep"))


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(start=3, end=3), "span"),
        (dict(start=-1), "span"),
        (dict(end=100_000), "span"),
        (dict(start=True), "span"),
        (dict(state="asleep"), "state"),
        (dict(throughput=math.nan), "throughput"),
        (dict(throughput=-1.0), "throughput"),
        (dict(throughput=math.inf), "throughput"),
        (dict(cache_bytes_free=-5), "cache_bytes_free"),
        (dict(address="no-port"), "address"),
        (dict(address="host:99999"), "address"),
        (dict(model="bad model"), "model"),
        (dict(version="1 .0"), "version"),
        (dict(expiration="soon"), "expiration"),
        (dict(dht_maddrs=["not a maddr"]), "dht_maddrs"),
        (dict(public_key=b"\x00" * 31), "public_key"),
        (dict(peer_id="0" * 32), "peer_id"),
    ],
)
def test_decode_checks_fields(changes, reason):
    identity = Identity.generate()
    fields = raw_fields(make_record(identity)) | changes
    with pytest.raises(RecordError, match=reason):
        decode_record(sign_raw(identity, fields))


def test_total_blocks_is_signed_and_optional():
    identity = Identity.generate()
    record = make_record(identity, total_blocks=30)
    assert decode_record(encode_record(identity, record)).total_blocks == 30
    older = raw_fields(make_record(identity))
    del older["total_blocks"]  # a node from before the field existed
    assert decode_record(sign_raw(identity, older)) == make_record(identity, expiration=older["expiration"])


@pytest.mark.parametrize("total_blocks", [2, -1, 1025, True, 4.0, "4", None])
def test_decode_checks_total_blocks(total_blocks):
    identity = Identity.generate()
    fields = raw_fields(make_record(identity, start=0, end=3)) | {"total_blocks": total_blocks}
    with pytest.raises(RecordError, match="total_blocks"):
        decode_record(sign_raw(identity, fields))


@pytest.mark.parametrize(
    "value",
    [b"", b"garbage", msgpack.packb([1, 2]), msgpack.packb({"record": b"x", "signature": b"y"}), b"\x80" * 10],
)
def test_decode_rejects_garbage(value):
    with pytest.raises(RecordError):
        decode_record(value)


def test_decode_rejects_pickle_and_ext_types():
    import pickle

    identity = Identity.generate()
    with pytest.raises(RecordError):
        decode_record(pickle.dumps(make_record(identity)))
    fields = raw_fields(make_record(identity)) | {"dht_maddrs": msgpack.ExtType(1, b"x")}
    with pytest.raises(RecordError, match="dht_maddrs"):
        decode_record(sign_raw(identity, fields))


def test_decode_rejects_forged_and_tampered():
    owner, forger = Identity.generate(), Identity.generate()
    record = make_record(owner)
    with pytest.raises(RecordError, match="bad signature"):
        decode_record(sign_raw(forger, raw_fields(record)))
    with pytest.raises(RecordError, match="bad signature"):
        decode_record(tamper(encode_record(owner, record), address="10.0.0.66:1"))


# --- validator on hand-built DHTRecords ---------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """What a peer may ask the DHT to store: key, subkey, value and expiration as the application gives them."""

    key: str
    subkey: object
    value: bytes
    expiration: float

    def dht_record(self) -> DHTRecord:
        # exactly how hivemind's DHTNode.store_many builds the record it hands to validators
        return DHTRecord(
            key=key_id(self.key),
            subkey=MSGPackSerializer.dumps(self.subkey),
            value=MSGPackSerializer.dumps(self.value),
            expiration_time=self.expiration,
        )


def valid_entry(identity: Identity, block: int = 0, **kw) -> tuple[ServerRecord, Entry]:
    record = make_record(identity, **kw)
    entry = Entry(block_key(record.model, block), identity.peer_id, encode_record(identity, record), record.expiration)
    return record, entry


def attacks(
    victim: Identity, attacker: Identity, model: str = MODEL
) -> tuple[ServerRecord, dict[str, tuple[Entry, str]]]:
    """The victim's valid record, and name -> (entry that must be refused, reason the validator gives).
    The attacker signs with its own key; its expirations are later than the victim's, to win if accepted."""
    victim_record, victim_entry = valid_entry(victim, model=model)
    own_record, own_entry = valid_entry(attacker, model=model, lifetime=31)
    evil = "10.66.66.66:6666"
    later = victim_record.expiration + 60
    return victim_record, {
        "forged signature": (
            replace(victim_entry, value=sign_raw(attacker, raw_fields(victim_record) | {"address": evil})),
            "bad signature",
        ),
        "tampered value": (replace(victim_entry, value=tamper(victim_entry.value, address=evil)), "bad signature"),
        "tampered expiration": (
            replace(victim_entry, value=tamper(victim_entry.value, expiration=later), expiration=later),
            "bad signature",
        ),
        "replayed with extended expiration": (replace(victim_entry, expiration=later), "expiration"),
        "wrong subkey": (replace(own_entry, subkey=victim.peer_id), "subkey"),
        "malformed model name key": (replace(own_entry, key="bad model.0"), "key"),
        "malformed model name in record": (
            replace(
                own_entry, key="bad model.0", value=sign_raw(attacker, raw_fields(own_record) | {"model": "bad model"})
            ),
            "model",
        ),
        "non-block key": (replace(own_entry, key=model), "key"),
        "block outside span": (replace(own_entry, key=block_key(model, 3)), "key"),
        "other model's key": (replace(own_entry, key=block_key("org/other", 0)), "key"),
        "garbage value": (replace(own_entry, value=b"\x00garbage"), "msgpack"),
        "no subkey": (replace(own_entry, subkey=None), "subkey"),
        "too far in the future": (
            valid_entry(attacker, model=model, lifetime=3600)[1],
            "max is",
        ),
    }


ATTACKS = list(attacks(Identity.generate(), Identity.generate())[1])


def test_validator_accepts_valid_records():
    validator = ServerRecordValidator()
    identity = Identity.generate()
    record, entry = valid_entry(identity, block=2)
    assert validator.validate(entry.dht_record())
    assert validator.check(entry.dht_record()) == (record, 2)


@pytest.mark.parametrize("name", ATTACKS)
def test_validator_refuses(name):
    entry, reason = attacks(Identity.generate(), Identity.generate())[1][name]
    validator = ServerRecordValidator()
    assert not validator.validate(entry.dht_record())
    with pytest.raises(RecordError, match=reason):
        validator.check(entry.dht_record())


def test_validator_refuses_non_bytes_values():
    identity = Identity.generate()
    _, entry = valid_entry(identity)
    record = entry.dht_record()
    for value in (MSGPackSerializer.dumps("text"), MSGPackSerializer.dumps({"a": 1}), b"\xc1", b""):
        assert not ServerRecordValidator().validate(replace(record, value=value))
    assert not ServerRecordValidator().validate(replace(record, expiration_time=math.nan))


def test_validator_interface():
    short, long = ServerRecordValidator(max_lifetime=10), ServerRecordValidator(max_lifetime=100)
    assert long.merge_with(short) and long.max_lifetime == 10
    assert not long.merge_with(hivemind.dht.crypto.RSASignatureValidator())
    _, entry = valid_entry(Identity.generate())
    record = entry.dht_record()
    assert long.sign_value(record) == long.strip_value(record) == record.value
    assert isinstance(long.priority, int)


def test_parse_entry():
    identity = Identity.generate()
    record, entry = valid_entry(identity)
    assert parse_entry(identity.peer_id, entry.value, record.expiration, model=MODEL, block=2) == record
    assert parse_entry("someone-else", entry.value) is None
    assert parse_entry(identity.peer_id, entry.value, record.expiration + 60) is None
    assert parse_entry(identity.peer_id, entry.value, model="org/other") is None
    assert parse_entry(identity.peer_id, entry.value, block=3) is None
    assert parse_entry(identity.peer_id, entry.value, now=record.expiration + 1) is None  # expired
    assert parse_entry(identity.peer_id, b"garbage") is None
    assert parse_entry(identity.peer_id, None) is None


# --- a real swarm on 127.0.0.1 -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rogue_swarm():
    """Two honest peers and, between them, an unmodified hivemind peer without our validator: it stores
    whatever it is given and serves it to whoever asks. Separate from `dht_peers`, whose stores it would answer
    (hivemind's store returns the last replica's answer). Loopback-only, like the rest of the test swarm."""
    dhts = []
    try:
        dhts.append(start_dht([]))
        dhts.append(
            hivemind.DHT(
                initial_peers=visible_maddrs(dhts[0]),
                start=True,
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                use_relay=False,
                auto_nat=False,
                nat_port_map=False,
            )
        )
        dhts.append(start_dht(visible_maddrs(dhts[1])))
        honest_a, rogue, honest_b = dhts
        yield [honest_a, honest_b], rogue
    finally:
        for dht in dhts:
            dht.shutdown()


def visible(dht: hivemind.DHT, entry: Entry) -> bool:
    """Whether `dht.get` returns exactly this value with this expiration under (key, subkey)."""
    found = dht.get(entry.key, latest=True)
    if found is not None and entry.subkey is None:
        return found.value == entry.value and found.expiration_time == entry.expiration
    if found is None or not isinstance(found.value, dict) or entry.subkey not in found.value:
        return False
    item = found.value[entry.subkey]
    return item.value == entry.value and item.expiration_time == entry.expiration


@pytest.mark.swarm
def test_announce_and_find(dht_peers):
    server, other_server, client = dht_peers
    identity = Identity.generate()
    record = make_record(identity, model="org/announced", start=1, end=3, dht_maddrs=tuple(visible_maddrs(server)))
    assert announce(server, identity, record) == {1: True, 2: True}
    for dht in dht_peers:
        assert find_servers(dht, "org/announced", TOTAL_BLOCKS) == {0: [], 1: [record], 2: [record], 3: []}
    assert find_servers(client, "org/announced", 0) == {}
    with pytest.raises(ValueError):
        find_servers(client, "bad model", TOTAL_BLOCKS)

    # a newer record from the same node replaces the old one; announcing a subset of the span works
    newer = replace(record, state="draining", expiration=record.expiration + 5)
    assert announce(other_server, identity, newer, blocks=[2]) == {2: True}
    assert find_servers(client, "org/announced", TOTAL_BLOCKS)[2] == [newer]
    with pytest.raises(ValueError):
        announce(server, identity, record, blocks=[3])
    with pytest.raises(ValueError):
        announce(server, identity, replace(record, expiration=get_dht_time() - 1))


@pytest.mark.swarm
async def test_announce_and_find_from_asyncio(dht_peers):
    identity = Identity.generate()
    record = make_record(identity, model="org/async", start=0, end=1)
    assert await announce(dht_peers[0], identity, record, return_future=True) == {0: True}
    assert await find_servers(dht_peers[2], "org/async", 1, return_future=True) == {0: [record]}


@pytest.mark.swarm
def test_attacks_are_refused_by_honest_peers(dht_peers):
    victim = Identity.generate()
    victim_record, cases = attacks(victim, Identity.generate(), model="org/honest-target")
    assert all(announce(dht_peers[0], victim, victim_record).values())
    for name, (entry, _) in cases.items():
        # the storing peer's own validator and every replica refuse it
        assert dht_peers[1].store(entry.key, entry.value, entry.expiration, subkey=entry.subkey) is False, name
    for name, (entry, _) in cases.items():
        for dht in dht_peers:
            assert not visible(dht, entry), name
    for dht in dht_peers:
        expected = {0: [victim_record], 1: [victim_record], 2: [victim_record], 3: []}
        assert find_servers(dht, "org/honest-target", TOTAL_BLOCKS) == expected


@pytest.mark.swarm
@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_from_a_rogue_peer_are_refused(rogue_swarm, name):
    honest, rogue = rogue_swarm
    model = f"org/rogue-target-{ATTACKS.index(name)}"  # a fresh key space, so the rogue's copy is the newest
    entry, _ = attacks(Identity.generate(), Identity.generate(), model=model)[1][name]
    rogue.store(entry.key, entry.value, entry.expiration, subkey=entry.subkey)
    assert visible(rogue, entry)  # the rogue holds it and serves it to whoever asks...
    for dht in honest:  # ...but honest peers refused to store it and drop the rogue's answers containing it
        assert not visible(dht, entry)
        assert find_servers(dht, model, TOTAL_BLOCKS) == {block: [] for block in range(TOTAL_BLOCKS)}


@pytest.mark.swarm
def test_p2pd_listens_only_on_loopback(dht_peers):
    children = [child for dht in dht_peers for child in psutil.Process(dht.pid).children(recursive=True)]
    daemons = [child for child in children if child.name() == "p2pd"]
    assert len(daemons) == len(dht_peers)
    listening = 0
    for process in [psutil.Process(dht.pid) for dht in dht_peers] + children:
        for conn in process.net_connections(kind="inet"):
            assert conn.laddr.ip == "127.0.0.1", (process.name(), conn)
            if conn.status == psutil.CONN_LISTEN:
                listening += 1
            if conn.raddr:
                assert conn.raddr.ip == "127.0.0.1", (process.name(), conn)
    assert listening >= len(dht_peers)


async def _local_signers_in_dht(_dht, node, key: str) -> list[str]:
    """The subkeys (peer ids) this peer itself stores under `key`: what it accepted, not what it can find."""
    from hivemind.dht.routing import DHTID

    found = node.protocol.storage.get(DHTID.generate(source=key))
    if found is None or not hasattr(found.value, "items"):
        return []
    return sorted(MSGPackSerializer.loads(k) if isinstance(k, bytes) else k for k, _ in found.value.items())


def local_signers(dht: hivemind.DHT, key: str) -> list[str]:
    return dht.run_coroutine(partial(_local_signers_in_dht, key=key))


@pytest.mark.swarm
def test_a_private_swarm_refuses_records_of_unlisted_keys_at_every_peer():
    """Three peers with --allow-keys (AllowListValidator) and one public peer that joins them. The public
    peer stores two validly signed records at every peer: a member's is kept by all three listed peers,
    a stranger's by none of them (each refuses it itself, whatever a client might filter later)."""
    member, stranger = Identity.generate(), Identity.generate()
    allowed = frozenset({member.public_key})
    dhts = []
    try:
        dhts.append(start_dht([], allow_keys=allowed))
        for _ in range(2):
            dhts.append(start_dht(visible_maddrs(dhts[-1]), allow_keys=allowed))
        outsider = start_dht(visible_maddrs(dhts[0]))  # no allow list: it takes any well-signed record
        dhts.append(outsider)
        ours, theirs = make_record(member, model="org/private"), make_record(stranger, model="org/private")
        announce(outsider, member, ours)
        announce(outsider, stranger, theirs)
        for block in range(ours.start, ours.end):
            key = block_key("org/private", block)
            assert local_signers(outsider, key) == sorted({member.peer_id, stranger.peer_id}), block
            for peer in dhts[:3]:
                assert local_signers(peer, key) == [member.peer_id], block
        for peer in dhts[:3]:
            assert find_servers(peer, "org/private", TOTAL_BLOCKS) == {0: [ours], 1: [ours], 2: [ours], 3: []}
    finally:
        for dht in dhts:
            dht.shutdown()
