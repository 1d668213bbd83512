"""One signed value under a DHT key and subkey, stored and read back: what model index entries, relay
entries and fraud reports all do (server records store under many block keys at once: dht_network.announce).

Each such value is signed by the peer whose id is its subkey and carries its own expiration, so reading one
back is the same check for all three: it decodes and verifies, sits under its signer's id, has not expired,
and (where the DHT says) expires when the DHT entry does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol, TypeVar

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.utils import get_logger
from hivemind.utils.timed_storage import DHTExpiration, get_dht_time

from .records import EXPIRATION_TOLERANCE, RecordError

logger = get_logger(__name__)


class Signed(Protocol):
    @property
    def peer_id(self) -> str: ...  # the signer, whose id is the subkey

    @property
    def expiration(self) -> float: ...


T = TypeVar("T", bound=Signed)


def store_signed(
    dht: hivemind.DHT, key: str, subkey: str, value: bytes, expiration: float, return_future: bool = False
) -> bool:
    """Stores `value` (already signed) under `key`/`subkey` until `expiration`; True if the DHT took it."""
    store = partial(_store, key=key, subkey=subkey, value=value, expiration=expiration)
    return dht.run_coroutine(store, return_future=return_future)


async def _store(_dht: hivemind.DHT, node: DHTNode, key: str, subkey: str, value: bytes, expiration: float) -> bool:
    # runs inside the DHT process: module-level, so that it pickles
    return bool(await node.store(key, value, expiration, subkey=subkey))


def read_signed(
    subkey: object,
    value: object,
    decode: Callable[[object], T],
    kind: str,
    expiration_time: DHTExpiration | None = None,
    now: DHTExpiration | None = None,
) -> T | None:
    """One value read back safely: `decode(value)` if it verifies, sits under its signer's peer id, is
    unexpired and (where `expiration_time` is given) matches the DHT entry's expiration; None otherwise."""
    try:
        entry = decode(value)
    except RecordError as e:
        logger.debug(f"ignored {kind} under subkey {subkey!r}: {e}")
        return None
    now = get_dht_time() if now is None else now
    if subkey != entry.peer_id or entry.expiration <= now:
        return None
    if expiration_time is not None and abs(expiration_time - entry.expiration) > EXPIRATION_TOLERANCE:
        return None
    return entry


async def latest_signed(
    node: DHTNode, key: str, parse: Callable[[object, object, DHTExpiration, DHTExpiration], T | None]
) -> list[T]:
    """Every value under `key` that `parse(subkey, value, expiration_time, now)` accepts, in one latest-value
    lookup (inside the DHT process); a plain value under the key is junk and gives nothing."""
    found = await node.get(key, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    entries = (parse(subkey, item.value, item.expiration_time, now) for subkey, item in found.value.items())
    return [e for e in entries if e is not None]
