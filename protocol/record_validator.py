"""The one record validator of torchnode's DHT: only signed server records under block keys get in.

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

from .dht_records import RecordError, ServerRecord, block_key, decode_record

logger = get_logger(__name__)

DEFAULT_MAX_LIFETIME = 120.0  # seconds: a record may not claim to live longer than this from now
EXPIRATION_TOLERANCE = 1e-3


class ServerRecordValidator(RecordValidatorBase):
    def __init__(self, max_lifetime: float = DEFAULT_MAX_LIFETIME):
        self.max_lifetime = max_lifetime

    def validate(self, record: DHTRecord) -> bool:
        try:
            self.check(record)
        except RecordError as e:
            logger.debug(f"refused DHT record: {e}")
            return False
        return True

    def check(self, record: DHTRecord, now: DHTExpiration | None = None) -> tuple[ServerRecord, int]:
        """Returns the server record and its block, or raises RecordError saying why it is refused."""
        try:
            value = msgpack.unpackb(record.value, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as e:
            raise RecordError(f"DHT value is not msgpack: {e}") from None
        if not isinstance(value, bytes):
            raise RecordError(f"DHT value must be encoded record bytes, got {type(value).__name__}")
        server = decode_record(value)
        if record.subkey != MSGPackSerializer.dumps(server.peer_id):
            raise RecordError(f"subkey is not the peer id {server.peer_id} of the record's signer")
        block = _span_key_ids(server.model, server.start, server.end).get(record.key)
        if block is None:
            raise RecordError(f"key is not a block key of {server.model} blocks [{server.start}, {server.end})")
        if not math.isfinite(record.expiration_time) or not math.isclose(
            server.expiration, record.expiration_time, rel_tol=0, abs_tol=EXPIRATION_TOLERANCE
        ):
            raise RecordError(
                f"DHT expiration {record.expiration_time} differs from the signed expiration {server.expiration}"
            )
        now = get_dht_time() if now is None else now
        if server.expiration > now + self.max_lifetime:
            raise RecordError(f"record expires {server.expiration - now:.1f} s from now, max is {self.max_lifetime}")
        return server, block

    # The record is signed inside its value, so there is nothing to add or strip.
    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value

    @property
    def priority(self) -> int:
        return 0  # it deserializes the value; signature validators that wrap values must run first (higher)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, ServerRecordValidator):
            return False
        self.max_lifetime = min(self.max_lifetime, other.max_lifetime)  # both policies hold
        return True


def key_id(key: str) -> bytes:
    """The bytes hivemind puts in DHTRecord.key for the application key `key`."""
    return DHTID.generate(source=key).to_bytes()


@functools.lru_cache(maxsize=128)  # <= 128 spans of <= MAX_BLOCKS ids: a few MiB at worst
def _span_key_ids(model: str, start: int, end: int) -> dict[bytes, int]:
    return {key_id(block_key(model, block)): block for block in range(start, end)}


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
    try:
        server = decode_record(value)
    except RecordError as e:
        logger.debug(f"ignored DHT entry under subkey {subkey!r}: {e}")
        return None
    now = get_dht_time() if now is None else now
    if (
        subkey != server.peer_id
        or server.expiration <= now
        or (
            expiration_time is not None
            and not math.isclose(expiration_time, server.expiration, rel_tol=0, abs_tol=EXPIRATION_TOLERANCE)
        )
        or (model is not None and server.model != model)
        or (block is not None and block not in server.blocks)
    ):
        return None
    return server
