"""The relay directory: one DHT key under which every relay says where nodes behind a NAT can reach it.

A relay (`torchnode coordinator --relay`, or a reachable `join --relay`) stores a signed `RelayEntry`
under `RELAY_KEY` (subkey = its peer id), in the same envelope as server records and model entries, and
refreshes it like them, so a dead relay leaves the directory by itself within its expiration. Nodes that
cannot be dialled pick a relay from here; `record_validator.RelayDirectoryValidator` keeps anything
else out of the key. Store and lookup run inside the DHT's own process, as in `dht_network.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import asdict, dataclass, fields
from typing import Literal, overload

import hivemind
from hivemind.dht.node import DHTNode

from ..wire.identity import PUBLIC_KEY_BYTES, Identity, peer_id_of
from .records import (
    MAX_ADDRESS_CHARS,
    RecordError,
    decode_signed,
    encode_signed,
    is_int,
    non_negative_float,
    short_str,
)
from .store import latest_signed, read_signed, store_signed

RELAY_KEY = "_torchnode.relays"  # never a block key: a block key ends in ".{digits}"
MAX_RELAY_NODES = 1 << 20


@dataclass(frozen=True)
class RelayEntry:
    peer_id: str
    public_key: bytes  # raw Ed25519, 32 bytes
    address: str  # "host:port" of the relay's control port (nodes register there; AutoNAT-style dial-backs)
    nodes: int  # nodes relayed now
    max_nodes: int  # the relay's --relay-max-nodes
    expiration: float  # absolute DHT time, equal to the DHT entry's expiration_time

    @property
    def free(self) -> int:
        return self.max_nodes - self.nodes


_FIELD_NAMES = tuple(f.name for f in fields(RelayEntry))


def encode_relay(identity: Identity, entry: RelayEntry) -> bytes:
    body_fields = asdict(entry) | {"expiration": float(entry.expiration)}
    return encode_signed(identity, entry, body_fields, check_relay_fields)


def decode_relay(value: object) -> RelayEntry:
    """Parses and verifies a directory value; raises RecordError saying what is wrong with it."""
    return decode_signed(value, check_relay_fields, "relay entry")


def check_relay_fields(raw: dict) -> RelayEntry:
    missing = [name for name in _FIELD_NAMES if name not in raw]
    if missing:
        raise RecordError(f"relay entry lacks fields {missing}")
    public_key = raw["public_key"]
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise RecordError("public_key must be 32 raw bytes")
    if raw["peer_id"] != peer_id_of(public_key):
        raise RecordError("peer_id is not the hash of public_key")
    address = short_str(raw, "address", MAX_ADDRESS_CHARS)
    host, colon, port = address.rpartition(":")
    if not host or not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise RecordError(f"address {address!r} is not 'host:port'")
    nodes, max_nodes = raw["nodes"], raw["max_nodes"]
    if not is_int(nodes) or not is_int(max_nodes) or not 0 <= nodes <= max_nodes <= MAX_RELAY_NODES:
        raise RecordError(f"nodes {nodes!r} / max_nodes {max_nodes!r} must satisfy 0 <= nodes <= max_nodes")
    return RelayEntry(
        peer_id=raw["peer_id"],
        public_key=public_key,
        address=address,
        nodes=nodes,
        max_nodes=max_nodes,
        expiration=non_negative_float(raw["expiration"], "expiration"),
    )


def announce_relay(dht: hivemind.DHT, identity: Identity, entry: RelayEntry, return_future: bool = False) -> bool:
    """Stores the signed `entry` under RELAY_KEY (subkey = peer id) until `entry.expiration`."""
    value = encode_relay(identity, entry)
    return store_signed(dht, RELAY_KEY, entry.peer_id, value, entry.expiration, return_future)


@overload
def find_relays(dht: hivemind.DHT, return_future: Literal[False] = False) -> list[RelayEntry]: ...


@overload
def find_relays(dht: hivemind.DHT, return_future: Literal[True]) -> Awaitable[list[RelayEntry]]: ...


def find_relays(dht: hivemind.DHT, return_future: bool = False) -> list[RelayEntry] | Awaitable[list[RelayEntry]]:
    """Every valid, unexpired relay entry, in one latest-value lookup (a future to await, with return_future)."""
    return dht.run_coroutine(_find_entries, return_future=return_future)


async def _find_entries(_dht: hivemind.DHT, node: DHTNode) -> list[RelayEntry]:
    entries = await latest_signed(node, RELAY_KEY, _parse_relay)
    return sorted(entries, key=lambda e: e.peer_id)


def _parse_relay(subkey: object, value: object, _expiration_time: float, now: float) -> RelayEntry | None:
    return read_signed(subkey, value, decode_relay, "relay entry", None, now)
