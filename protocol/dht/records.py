"""The signed server record a node announces in the DHT under each block it serves.

DHT key `"{model}.{block}"`, subkey = the node's peer id, value = `encode_record(...)`:

    msgpack({"record": <msgpack map of the ServerRecord fields>, "signature": <Ed25519 over those bytes>})

The signature covers the exact bytes of the inner map, so decoding never re-serializes anything; the
record names its own public key, and its peer id must be the hash of that key. Everything that comes
from the network goes through `decode_record`, which checks types and ranges and raises `RecordError`
with a readable reason. No pickle anywhere: msgpack with ext types refused.

This module knows nothing of hivemind; `record_validator.py` ties it to the DHT's keys and expirations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Protocol, TypeGuard, TypeVar

import msgpack

from ..version import UNSAID_PROTOCOL, protocol_major
from ..wire.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, peer_id_of, verify
from .credit import validate_contact, validate_count, validate_public_name

STATES = ("joining", "online", "draining")


class SignerNamed(Protocol):
    """A signed entry names its signer: the key its signature is checked against, and that key's peer id."""

    @property
    def public_key(self) -> bytes: ...

    @property
    def peer_id(self) -> str: ...


T = TypeVar("T", bound=SignerNamed)
DTYPES = ("", "float32", "bfloat16", "float16")  # a span's compute dtype ("": a record too old to say)
QUANTS = ("", "none", "int8", "int4", "nf4")  # its weight quantization (models/quantization.py QUANT_MODES)
MAX_BLOCKS = 1024  # no model has this many blocks; bounds the work a validator does per record
MAX_RECORD_BYTES = 16 * 1024
MAX_DHT_MADDRS = 16
MAX_SHORT_STR = 128
MAX_ADDRESS_CHARS = 255
MAX_ADAPTERS = 32  # LoRA adapter names one node may announce
MAX_MADDR_CHARS = 256
EXPIRATION_TOLERANCE = 1e-3  # seconds: a DHT entry's expiration may differ this much from the signed one

# letters, digits, `-`, `_`, `.`, `/` (hub ids like `org/name`); 1..128 chars; no leading/trailing dot or slash
_MODEL_NAME = re.compile(r"(?![./])[A-Za-z0-9._/-]{1,128}(?<![./])")
_BLOCK_INDEX = re.compile(r"0|[1-9][0-9]*")  # canonical: no sign, no leading zeros, ASCII digits only
_NO_SPACE = re.compile(r"\S*")


class RecordError(ValueError):
    """A DHT record (or key) that is malformed, forged or inconsistent."""


def validate_model_name(model: str) -> str:
    """Returns `model` if it is a well-formed model name, raises ValueError otherwise."""
    if not isinstance(model, str) or not _MODEL_NAME.fullmatch(model):
        raise ValueError(f"malformed model name {model!r}: use 1-128 letters, digits, '-', '_', '.', '/'")
    return model


def block_key(model: str, block: int) -> str:
    """The DHT key under which servers of `block` of `model` announce themselves."""
    validate_model_name(model)
    if not is_int(block) or block < 0:
        raise ValueError(f"block index must be a non-negative int, got {block!r}")
    return f"{model}.{block}"


def parse_block_key(key: str) -> tuple[str, int]:
    """Inverse of `block_key`: splits at the last dot; raises ValueError for anything else."""
    if not isinstance(key, str):
        raise ValueError(f"DHT key must be a str, got {type(key).__name__}")
    model, dot, index = key.rpartition(".")
    if not dot or not _BLOCK_INDEX.fullmatch(index):
        raise ValueError(f"malformed block key {key!r}: expected '{{model}}.{{block}}'")
    return validate_model_name(model), int(index)


@dataclass(frozen=True)
class ServerRecord:
    peer_id: str
    public_key: bytes  # raw Ed25519, 32 bytes
    address: str  # "host:port" of the node's gRPC server
    model: str
    revision: str
    start: int  # first block served
    end: int  # one past the last block served
    state: str  # one of STATES
    throughput: float  # tokens/s
    cache_bytes_free: int
    version: str
    expiration: float  # absolute DHT time (seconds), equal to the DHT entry's expiration_time
    dht_maddrs: tuple[str, ...] = ()  # the node's own DHT multiaddrs, usable as initial peers
    total_blocks: int = 0  # blocks in the whole model; 0 = not said (records of older nodes)
    relay: str = ""  # peer id of the relay `address` belongs to ("reachable through relay R"); "" = direct
    adapters: tuple[str, ...] = ()  # names of the LoRA adapters the node serves (--adapters)
    protocol: str = UNSAID_PROTOCOL  # protocol version "MAJOR.MINOR" the node speaks (protocol/version.py)
    dtype: str = ""  # compute dtype of the span ("float32", "bfloat16", "float16"; "": not said)
    quant: str = ""  # weight quantization ("none", "int8", "int4", "nf4"; "": not said)
    # credit for volunteers (credit.py): `join --public-name/--contact`, and what the node served since it started
    public_name: str = ""
    contact: str = ""
    served_tokens: int = 0  # sessions' tokens its blocks computed (each token of each sequence, once per pass)
    served_sessions: int = 0  # inference sessions opened
    uptime: float = 0.0  # seconds since the node started serving

    @property
    def blocks(self) -> range:
        return range(self.start, self.end)


def latest_per_peer(servers: dict[int, list[ServerRecord]]) -> dict[str, ServerRecord]:
    """{peer id: its record with the latest expiration} from a per-block lookup (a node appears once per
    block it serves, and a moving node may briefly have two records)."""
    latest: dict[str, ServerRecord] = {}
    for record in (r for records in servers.values() for r in records):
        if record.peer_id not in latest or record.expiration > latest[record.peer_id].expiration:
            latest[record.peer_id] = record
    return latest


_OPTIONAL_FIELDS = {
    "total_blocks": 0,
    "relay": "",
    "adapters": [],
    "protocol": UNSAID_PROTOCOL,
    "dtype": "",
    "quant": "",
    "public_name": "",
    "contact": "",
    "served_tokens": 0,
    "served_sessions": 0,
    "uptime": 0.0,
}  # added after the first release: absent in older records
_FIELD_NAMES = tuple(f.name for f in fields(ServerRecord) if f.name not in _OPTIONAL_FIELDS)


def encode_record(identity: Identity, record: ServerRecord) -> bytes:
    """Signs `record` with `identity` and returns the bytes to store as the DHT value."""
    body_fields = asdict(record)
    body_fields["throughput"] = float(record.throughput)
    body_fields["expiration"] = float(record.expiration)
    body_fields["dht_maddrs"] = list(record.dht_maddrs)
    body_fields["adapters"] = list(record.adapters)
    body_fields["uptime"] = float(record.uptime)
    return encode_signed(identity, record, body_fields, _check_fields)


def decode_record(value: object) -> ServerRecord:
    """Parses and verifies a DHT value; raises RecordError saying what is wrong with it."""
    return decode_signed(value, _check_fields, "record")


def encode_signed(identity: Identity, entry: SignerNamed, body_fields: dict, check: Callable[[dict], object]) -> bytes:
    """Checks and signs the field map of a record dataclass that names its signer (`peer_id`, `public_key`):
    server records, model index entries, relay entries. Never signs what others would refuse."""
    if entry.public_key != identity.public_key or entry.peer_id != identity.peer_id:
        raise RecordError(f"{type(entry).__name__}: public_key / peer_id do not belong to the signing identity")
    check(body_fields)
    return sign_fields(identity, body_fields)


def decode_signed(value: object, check: Callable[[dict], T], what: str) -> T:
    """Opens a signed envelope, checks its fields with `check` and the signature with the key they name."""
    body_fields, body, signature = open_signed(value)
    entry = check(body_fields)
    if not verify(entry.public_key, signature, body):
        raise RecordError(f"bad signature on the {what} of peer {entry.peer_id}")
    return entry


def sign_fields(identity: Identity, body_fields: dict) -> bytes:
    """The signed envelope of a field map (server records, model index entries): the DHT value."""
    body = msgpack.packb(body_fields, use_bin_type=True)
    value = msgpack.packb({"record": body, "signature": identity.sign(body)}, use_bin_type=True)
    if len(value) > MAX_RECORD_BYTES:
        raise RecordError(f"encoded record is {len(value)} bytes, more than {MAX_RECORD_BYTES}")
    return value


def open_signed(value: object) -> tuple[dict, bytes, bytes]:
    """(field map, signed bytes, signature) of an envelope made by `sign_fields`. The caller checks the
    fields, then the signature against the public key they name."""
    if not isinstance(value, bytes):
        raise RecordError(f"record value must be bytes, got {type(value).__name__}")
    if len(value) > MAX_RECORD_BYTES:
        raise RecordError(f"record is {len(value)} bytes, more than {MAX_RECORD_BYTES}")
    envelope = _unpack(value, "envelope")
    if not isinstance(envelope, dict) or set(envelope) != {"record", "signature"}:
        raise RecordError("envelope must be a map with exactly 'record' and 'signature'")
    body, signature = envelope["record"], envelope["signature"]
    if not isinstance(body, bytes) or not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise RecordError("envelope 'record' and 'signature' must be bytes (signature of 64 bytes)")
    body_fields = _unpack(body, "record")
    if not isinstance(body_fields, dict):
        raise RecordError("record must be a msgpack map")
    return body_fields, body, signature


def _unpack(data: bytes, what: str) -> object:
    try:
        # no ext_hook: ext types come back as msgpack.ExtType and fail the type checks below
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as e:
        raise RecordError(f"{what} is not valid msgpack: {e}") from None


def _check_fields(raw: dict) -> ServerRecord:
    """Type and range checks of a decoded field map. Unknown extra fields are ignored (newer versions)."""
    raw = _OPTIONAL_FIELDS | raw
    missing = [name for name in _FIELD_NAMES if name not in raw]
    if missing:
        raise RecordError(f"record lacks fields {missing}")
    public_key = signer_key(raw)
    address = host_port(raw, "address")
    model = record_model(raw)
    start, end = raw["start"], raw["end"]
    check_span(start, end)
    total_blocks = raw["total_blocks"]
    if not is_int(total_blocks) or not 0 <= total_blocks <= MAX_BLOCKS or (total_blocks and end > total_blocks):
        raise RecordError(f"total_blocks {total_blocks!r} must be 0 (unknown) or in [end={end}, {MAX_BLOCKS}]")
    if raw["state"] not in STATES:
        raise RecordError(f"state {raw['state']!r} is not one of {STATES}")
    throughput = non_negative_float(raw["throughput"], "throughput")
    cache_bytes_free = raw["cache_bytes_free"]
    if not is_int(cache_bytes_free) or not 0 <= cache_bytes_free < 2**63:
        raise RecordError("cache_bytes_free must be a non-negative int64")
    expiration = non_negative_float(raw["expiration"], "expiration")
    maddrs = raw["dht_maddrs"]
    if not isinstance(maddrs, list) or len(maddrs) > MAX_DHT_MADDRS:
        raise RecordError(f"dht_maddrs must be a list of at most {MAX_DHT_MADDRS} multiaddrs")
    for maddr in maddrs:
        if not isinstance(maddr, str) or not maddr.startswith("/") or len(maddr) > MAX_MADDR_CHARS:
            raise RecordError(f"dht_maddrs entry {maddr!r} is not a multiaddr")
    return ServerRecord(
        peer_id=raw["peer_id"],
        public_key=public_key,
        address=address,
        model=model,
        revision=short_str(raw, "revision", MAX_SHORT_STR, allow_empty=True),
        start=start,
        end=end,
        state=raw["state"],
        throughput=throughput,
        cache_bytes_free=cache_bytes_free,
        version=short_str(raw, "version", MAX_SHORT_STR),
        expiration=expiration,
        dht_maddrs=tuple(maddrs),
        total_blocks=total_blocks,
        relay=_relay_peer_id(raw["relay"]),
        adapters=adapter_names(raw["adapters"]),
        protocol=_protocol(raw["protocol"]),
        dtype=_one_of(raw, "dtype", DTYPES),
        quant=_one_of(raw, "quant", QUANTS),
        **_credit_fields(raw),
    )


def _credit_fields(raw: dict) -> dict:
    """The volunteer's name, contact and counters of a record (credit.py), checked."""
    try:
        return dict(
            public_name=validate_public_name(raw["public_name"]),
            contact=validate_contact(raw["contact"]),
            served_tokens=validate_count(raw["served_tokens"], "served_tokens"),
            served_sessions=validate_count(raw["served_sessions"], "served_sessions"),
            uptime=non_negative_float(raw["uptime"], "uptime"),
        )
    except ValueError as e:
        raise RecordError(str(e)) from None


def signer_key(raw: dict) -> bytes:
    """A signed field map's `public_key`, checked to be 32 bytes whose hash is its `peer_id`."""
    public_key = raw["public_key"]
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise RecordError("public_key must be 32 raw bytes")
    if raw["peer_id"] != peer_id_of(public_key):
        raise RecordError("peer_id is not the hash of public_key")
    return public_key


def host_port(raw: dict, name: str) -> str:
    """Field `name` of a record, checked to be 'host:port'."""
    address = short_str(raw, name, MAX_ADDRESS_CHARS)
    host, colon, port = address.rpartition(":")
    if not host or not colon or not _BLOCK_INDEX.fullmatch(port) or not 0 < int(port) < 65536:
        raise RecordError(f"{name} {address!r} is not 'host:port'")
    return address


def record_model(raw: dict) -> str:
    try:
        return validate_model_name(raw["model"])
    except ValueError as e:
        raise RecordError(str(e)) from None


def check_span(start: object, end: object) -> None:
    if not is_int(start) or not is_int(end) or not 0 <= start < end <= MAX_BLOCKS:
        raise RecordError(f"span [{start!r}, {end!r}) must satisfy 0 <= start < end <= {MAX_BLOCKS}")


def adapter_names(adapters: object) -> tuple[str, ...]:
    """A record's `adapters` field: at most MAX_ADAPTERS names, each shaped like a model name."""
    if not isinstance(adapters, list) or len(adapters) > MAX_ADAPTERS:
        raise RecordError(f"adapters must be a list of at most {MAX_ADAPTERS} names")
    for name in adapters:
        try:
            validate_model_name(name)
        except ValueError:
            raise RecordError(f"adapter name {name!r} is malformed") from None
    return tuple(adapters)


def _protocol(protocol: object) -> str:
    """The `protocol` field: "MAJOR.MINOR" (a node of another major is skipped by clients, not refused here)."""
    if not isinstance(protocol, str):
        raise RecordError(f"protocol must be a string MAJOR.MINOR, got {protocol!r}")
    try:
        protocol_major(protocol)
    except ValueError as e:
        raise RecordError(str(e)) from None
    return protocol


def _one_of(raw: dict, name: str, allowed: tuple[str, ...]) -> str:
    if raw[name] not in allowed:
        raise RecordError(f"{name} must be one of {allowed}, got {raw[name]!r}")
    return raw[name]


def _relay_peer_id(relay: object) -> str:
    """The `relay` field: empty (the node is dialled directly) or a relay's peer id."""
    if not isinstance(relay, str) or len(relay) > MAX_SHORT_STR or not re.fullmatch(r"[0-9a-f]*", relay):
        raise RecordError(f"relay must be empty or a peer id (hex), got {relay!r}")
    return relay


def is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def non_negative_float(x: object, name: str) -> float:
    if not (isinstance(x, float) or is_int(x)) or not math.isfinite(x) or x < 0:
        raise RecordError(f"{name} must be a finite non-negative number, got {x!r}")
    return float(x)


def short_str(raw: dict, name: str, max_chars: int, allow_empty: bool = False) -> str:
    s = raw[name]
    if not isinstance(s, str) or len(s) > max_chars or (not s and not allow_empty) or not _NO_SPACE.fullmatch(s):
        raise RecordError(f"{name} must be a string of at most {max_chars} chars without whitespace, got {s!r}")
    return s
