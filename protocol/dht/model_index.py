"""The model index: one DHT key under which every node says which model it serves.

Server records live under `"{model}.{block}"`, so finding them needs the model's name first: a
dashboard or `torchnode models` that is not told the name would see nothing. The index fixes that with
one well-known key, `INDEX_KEY`; each node stores a signed `ModelEntry` under it (subkey = its peer id):

    msgpack({"record": <msgpack map of the ModelEntry fields>, "signature": <Ed25519 over those bytes>})

exactly like server records (same envelope, same size bound, same checks of the peer id), refreshed
with them by the node's announcer and expiring with them, so a dead node's model leaves the index by
itself. `record_validator.ModelIndexValidator` keeps anything else out of the key.

The store and lookup functions run inside the DHT's own process (`dht.run_coroutine`), as in
`dht_network.py`; `find_models` returns only entries that are signed, unexpired and announced under
their own peer id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import DHTExpiration, get_dht_time

from ..wire.identity import PUBLIC_KEY_BYTES, Identity, peer_id_of
from .records import (
    MAX_BLOCKS,
    MAX_SHORT_STR,
    RecordError,
    adapter_names,
    decode_signed,
    encode_signed,
    is_int,
    non_negative_float,
    short_str,
    validate_model_name,
)
from .store import latest_signed, read_signed, store_signed

INDEX_KEY = "_torchnode.models"  # never a block key: a block key ends in ".{digits}"
_FAMILY = re.compile(r"[a-z0-9_-]{1,64}")  # transformers model_type: "llama", "qwen2", "mixtral", ...


@dataclass(frozen=True)
class ModelEntry:
    peer_id: str
    public_key: bytes  # raw Ed25519, 32 bytes
    model: str  # the name nodes announce server records under
    revision: str  # checkpoint fingerprint
    family: str  # transformers model_type
    total_blocks: int
    adapters: tuple[str, ...]  # adapter names the node serves (none yet)
    expiration: float  # absolute DHT time, equal to the DHT entry's expiration_time


def encode_entry(identity: Identity, entry: ModelEntry) -> bytes:
    """Signs `entry` with `identity`: the bytes to store under INDEX_KEY."""
    body_fields = asdict(entry) | {"adapters": list(entry.adapters), "expiration": float(entry.expiration)}
    return encode_signed(identity, entry, body_fields, check_entry_fields)


def decode_entry(value: object) -> ModelEntry:
    """Parses and verifies an index value; raises RecordError saying what is wrong with it."""
    return decode_signed(value, check_entry_fields, "model entry")


_FIELD_NAMES = tuple(f.name for f in fields(ModelEntry))


def check_entry_fields(raw: dict) -> ModelEntry:
    """Type and range checks of a decoded field map; unknown extra fields are ignored (newer versions)."""
    missing = [name for name in _FIELD_NAMES if name not in raw]
    if missing:
        raise RecordError(f"model entry lacks fields {missing}")
    public_key = raw["public_key"]
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise RecordError("public_key must be 32 raw bytes")
    if raw["peer_id"] != peer_id_of(public_key):
        raise RecordError("peer_id is not the hash of public_key")
    try:
        model = validate_model_name(raw["model"])
    except ValueError as e:
        raise RecordError(str(e)) from None
    family = raw["family"]
    if not isinstance(family, str) or not _FAMILY.fullmatch(family):
        raise RecordError(f"family {family!r} must be 1-64 of a-z, 0-9, '_', '-'")
    total_blocks = raw["total_blocks"]
    if not is_int(total_blocks) or not 1 <= total_blocks <= MAX_BLOCKS:
        raise RecordError(f"total_blocks {total_blocks!r} must be in [1, {MAX_BLOCKS}]")
    adapters = adapter_names(raw["adapters"])
    return ModelEntry(
        peer_id=raw["peer_id"],
        public_key=public_key,
        model=model,
        revision=short_str(raw, "revision", MAX_SHORT_STR, allow_empty=True),
        family=family,
        total_blocks=total_blocks,
        adapters=adapters,
        expiration=non_negative_float(raw["expiration"], "expiration"),
    )


def parse_index_entry(
    subkey: object, value: object, expiration_time: DHTExpiration | None = None, now: DHTExpiration | None = None
) -> ModelEntry | None:
    """One entry of `dht.get(INDEX_KEY)` read back safely: the entry if it is signed, announced under its
    own peer id, unexpired and (where given) matches the DHT expiration; None otherwise."""
    return read_signed(subkey, value, decode_entry, "model index entry", expiration_time, now)


@dataclass(frozen=True)
class IndexedModel:
    """What the index says about one model: every node's entry, grouped."""

    name: str
    entries: tuple[ModelEntry, ...]

    @property
    def families(self) -> list[str]:
        return sorted({e.family for e in self.entries})

    @property
    def revisions(self) -> list[str]:
        return sorted({e.revision for e in self.entries})

    @property
    def total_blocks(self) -> int:
        """The most common block count announced (ties: the larger); the monitor still votes on Info."""
        counts: dict[int, int] = {}
        for e in self.entries:
            counts[e.total_blocks] = counts.get(e.total_blocks, 0) + 1
        return max(counts, key=lambda n: (counts[n], n), default=0)


def group_by_model(entries: Iterable[ModelEntry]) -> dict[str, IndexedModel]:
    """{model name: IndexedModel}, sorted by name."""
    by_name: dict[str, list[ModelEntry]] = {}
    for e in entries:
        by_name.setdefault(e.model, []).append(e)
    return {name: IndexedModel(name, tuple(sorted(by_name[name], key=lambda e: e.peer_id))) for name in sorted(by_name)}


def announce_model(dht: hivemind.DHT, identity: Identity, entry: ModelEntry, return_future: bool = False) -> bool:
    """Stores the signed `entry` under INDEX_KEY (subkey = peer id) until `entry.expiration`."""
    if entry.expiration <= get_dht_time():
        raise ValueError("entry.expiration is in the past")
    value = encode_entry(identity, entry)
    return store_signed(dht, INDEX_KEY, entry.peer_id, value, entry.expiration, return_future)


def find_models(dht: hivemind.DHT, return_future: bool = False) -> list[ModelEntry]:
    """Every valid, unexpired entry of the index (one per node), in one latest-value lookup."""
    return dht.run_coroutine(_find_entries, return_future=return_future)


# Coroutines below run inside the DHT process (they must be module-level to be picklable).


async def _find_entries(_dht: hivemind.DHT, node: DHTNode) -> list[ModelEntry]:
    entries = await latest_signed(node, INDEX_KEY, parse_index_entry)
    return sorted(entries, key=lambda e: (e.model, e.peer_id))
