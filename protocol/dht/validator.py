"""The record validators of torchnode's DHT: only signed server records under block keys, signed model
entries under the model index key, signed relay entries under the relay directory key and signed fraud
reports under the report key of the node they name get in (`SwarmValidator` dispatches between them).

How hivemind 1.1.12 hands records to a validator (dht/node.py, dht/protocol.py):
  - `DHTRecord.key` is NOT the key string: it is `DHTID.generate(source=key).to_bytes()`, the SHA-1 of
    the msgpack of the key. So the key is checked by recomputing the ids of the record's own blocks.
  - `DHTRecord.subkey` is the msgpack of the subkey (our peer id, a str); a plain value without subkey
    arrives as msgpack(None) and is refused.
  - `DHTRecord.value` is the msgpack of what the application stored (our `encode_record` bytes).
  - `validate` runs when a peer asks us to store (rpc_store), on our own stores, and on every value a
    peer returns to our `get` (call_find). One bad subkey in a returned dictionary drops the whole
    dictionary from that peer, so `validate` does NOT refuse merely expired records (an honest peer's
    entry can expire in flight); readers drop them with `parse_entry`.
"""

from __future__ import annotations

import functools
import math

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_logger
from hivemind.utils.timed_storage import DHTExpiration, get_dht_time

from .fraud_reports import MAX_REPORT_LIFETIME, FraudReport, decode_report, report_key
from .model_index import INDEX_KEY, decode_entry
from .records import EXPIRATION_TOLERANCE, RecordError, ServerRecord, block_key, decode_record, open_signed
from .relay_directory import RELAY_KEY, decode_relay
from .store import read_signed

logger = get_logger(__name__)

DEFAULT_MAX_LIFETIME = 120.0  # seconds: a record may not claim to live longer than this from now


def key_id(key: str) -> bytes:
    """The bytes hivemind puts in DHTRecord.key for the application key `key`."""
    return DHTID.generate(source=key).to_bytes()


INDEX_KEY_ID = key_id(INDEX_KEY)
RELAY_KEY_ID = key_id(RELAY_KEY)


class _SignedInValue(RecordValidatorBase):
    """Base of our validators: records signed inside their value (nothing to add or strip), refused with
    a logged reason, and a lifetime bound that holds for both policies when two validators merge."""

    what = "DHT record"

    def __init__(self, max_lifetime: float = DEFAULT_MAX_LIFETIME):
        self.max_lifetime = max_lifetime

    def check(self, record: DHTRecord, now: DHTExpiration | None = None) -> object:
        raise NotImplementedError

    def validate(self, record: DHTRecord) -> bool:
        try:
            self.check(record)
        except RecordError as e:
            logger.debug(f"refused {self.what}: {e}")
            return False
        return True

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if type(other) is not type(self):
            return False
        self.max_lifetime = min(self.max_lifetime, other.max_lifetime)  # both policies hold
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value

    @property
    def priority(self) -> int:
        return 0  # they deserialize the value; signature validators that wrap values must run first (higher)


class ServerRecordValidator(_SignedInValue):
    """Only signed server records under the block keys of their own span, each under its signer's id."""

    def check(self, record: DHTRecord, now: DHTExpiration | None = None) -> tuple[ServerRecord, int]:
        """Returns the server record and its block, or raises RecordError saying why it is refused."""
        server = decode_record(_unpack_value(record))
        if record.subkey != MSGPackSerializer.dumps(server.peer_id):
            raise RecordError(f"subkey is not the peer id {server.peer_id} of the record's signer")
        block = _span_key_ids(server.model, server.start, server.end).get(record.key)
        if block is None:
            raise RecordError(f"key is not a block key of {server.model} blocks [{server.start}, {server.end})")
        _check_expiration(record, server.expiration, self.max_lifetime, now)
        return server, block


class _DirectoryValidator(_SignedInValue):
    """Only signed entries under one fixed key (a directory: every node's entry side by side), each under
    its signer's peer id. Subclasses name the key and the decoder of their entry type."""

    key_id: bytes
    decode: staticmethod
    misplaced: str  # the refusal of an entry stored under another key

    def check(self, record: DHTRecord, now: DHTExpiration | None = None) -> object:
        """Returns the entry, or raises RecordError saying why it is refused."""
        if record.key != self.key_id:
            raise RecordError(self.misplaced)
        entry = self.decode(_unpack_value(record))
        if record.subkey != MSGPackSerializer.dumps(entry.peer_id):
            raise RecordError(f"subkey is not the peer id {entry.peer_id} of the entry's signer")
        _check_expiration(record, entry.expiration, self.max_lifetime, now)
        return entry


class ModelIndexValidator(_DirectoryValidator):
    """Model entries (protocol/dht/model_index.py) under INDEX_KEY."""

    what, key_id, decode = "model index entry", INDEX_KEY_ID, staticmethod(decode_entry)
    misplaced = "a model entry must be stored under the model index key"


class RelayDirectoryValidator(_DirectoryValidator):
    """Relay entries (protocol/dht/relay_directory.py) under RELAY_KEY."""

    what, key_id, decode = "relay entry", RELAY_KEY_ID, staticmethod(decode_relay)
    misplaced = "a relay entry must be stored under the relay directory key"


class FraudReportValidator(_SignedInValue):
    """Only signed fraud reports (protocol/dht/fraud_reports.py) under the report key of the node they name,
    each under its reporter's id; they may live up to MAX_REPORT_LIFETIME (server records: much less)."""

    what = "fraud report"

    def __init__(self, max_lifetime: float = MAX_REPORT_LIFETIME):
        super().__init__(max_lifetime)

    def check(self, record: DHTRecord, now: DHTExpiration | None = None) -> FraudReport:
        report = decode_report(_unpack_value(record))
        if record.key != key_id(report_key(report.node_peer_id)):
            raise RecordError(f"a fraud report must be stored under the report key of node {report.node_peer_id}")
        if record.subkey != MSGPackSerializer.dumps(report.peer_id):
            raise RecordError(f"subkey is not the peer id {report.peer_id} of the report's signer")
        _check_expiration(record, report.expiration, self.max_lifetime, now)
        return report


class SwarmValidator(_SignedInValue):
    """The DHT's one validator: records under the model index key go to `ModelIndexValidator`, under the
    relay directory key to `RelayDirectoryValidator`, fraud reports (their signed fields name a node: the
    key is a hash, so the value says which kind it claims to be, and that validator checks the key) to
    `FraudReportValidator`, all others to `ServerRecordValidator`. (hivemind applies separate validators
    to every record, all of which must accept it, so several kinds of keys need one that dispatches.)"""

    def __init__(self, max_lifetime: float = DEFAULT_MAX_LIFETIME, report_lifetime: float = MAX_REPORT_LIFETIME):
        self.servers = ServerRecordValidator(max_lifetime)
        self.index = ModelIndexValidator(max_lifetime)
        self.relays = RelayDirectoryValidator(max_lifetime)
        self.reports = FraudReportValidator(report_lifetime)

    def validate(self, record: DHTRecord) -> bool:
        if record.key == RELAY_KEY_ID:
            return self.relays.validate(record)
        if record.key == INDEX_KEY_ID:
            return self.index.validate(record)
        return (self.reports if _claims_report(record) else self.servers).validate(record)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if isinstance(other, SwarmValidator):
            return (
                self.servers.merge_with(other.servers)
                and self.index.merge_with(other.index)
                and self.relays.merge_with(other.relays)
                and self.reports.merge_with(other.reports)
            )
        return self.servers.merge_with(other) or self.index.merge_with(other)


class AllowListValidator(_SignedInValue):
    """Private swarms (--allow-keys): only records signed by a listed key get in. It runs beside the
    SwarmValidator (hivemind asks every validator; all must accept), so it checks only the signer."""

    what = "record of a key not on the allow list"

    def __init__(self, allowed: frozenset[bytes]):
        super().__init__()
        self.allowed = frozenset(allowed)

    def check(self, record: DHTRecord, now: DHTExpiration | None = None) -> bytes:
        body_fields, _, _ = open_signed(_unpack_value(record))
        key = body_fields.get("public_key")
        if not isinstance(key, bytes) or key not in self.allowed:
            raise RecordError("signer is not on the allow list")
        return key  # the signature itself is the SwarmValidator's to check

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, AllowListValidator):
            return False
        self.allowed &= other.allowed  # both lists hold
        return True


@functools.lru_cache(maxsize=128)  # <= 128 spans of <= MAX_BLOCKS ids: a few MiB at worst
def _span_key_ids(model: str, start: int, end: int) -> dict[bytes, int]:
    return {key_id(block_key(model, block)): block for block in range(start, end)}


def _unpack_value(record: DHTRecord) -> bytes:
    try:
        value = msgpack.unpackb(record.value, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as e:
        raise RecordError(f"DHT value is not msgpack: {e}") from None
    if not isinstance(value, bytes):
        raise RecordError(f"DHT value must be encoded record bytes, got {type(value).__name__}")
    return value


def _claims_report(record: DHTRecord) -> bool:
    """Whether a record's signed fields say it is a fraud report (its validator then checks everything)."""
    try:
        body_fields, _, _ = open_signed(_unpack_value(record))
    except RecordError:
        return False  # the server record validator refuses it with its reason
    return "node_peer_id" in body_fields


def _check_expiration(record: DHTRecord, signed: float, max_lifetime: float, now: DHTExpiration | None) -> None:
    """The DHT entry's expiration must be the signed one, and not too far ahead."""
    if not math.isfinite(record.expiration_time) or not math.isclose(
        signed, record.expiration_time, rel_tol=0, abs_tol=EXPIRATION_TOLERANCE
    ):
        raise RecordError(f"DHT expiration {record.expiration_time} differs from the signed expiration {signed}")
    now = get_dht_time() if now is None else now
    if signed > now + max_lifetime:
        raise RecordError(f"record expires {signed - now:.1f} s from now, max is {max_lifetime}")


def parse_entry(
    subkey: object,
    value: object,
    expiration_time: DHTExpiration | None = None,
    *,
    model: str | None = None,
    block: int | None = None,
    now: DHTExpiration | None = None,
) -> ServerRecord | None:
    """Reads one entry of `dht.get(block_key(...))` back safely: the record if it is signed, announced
    under its own peer id, not expired, and (where given) matches the entry's expiration, model and
    block; None otherwise. For clients and dashboards that read the DHT themselves."""
    server = read_signed(subkey, value, decode_record, "DHT entry", expiration_time, now)
    if (
        server is None
        or (model is not None and server.model != model)
        or (block is not None and block not in server.blocks)
    ):
        return None
    return server
