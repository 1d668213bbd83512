"""Storing one signed value under a DHT key and subkey: what model index entries, relay entries and fraud
reports all do (server records store under many block keys at once: dht_network.announce)."""

from __future__ import annotations

from functools import partial

import hivemind
from hivemind.dht.node import DHTNode


def store_signed(
    dht: hivemind.DHT, key: str, subkey: str, value: bytes, expiration: float, return_future: bool = False
) -> bool:
    """Stores `value` (already signed) under `key`/`subkey` until `expiration`; True if the DHT took it."""
    store = partial(_store, key=key, subkey=subkey, value=value, expiration=expiration)
    return dht.run_coroutine(store, return_future=return_future)


async def _store(_dht: hivemind.DHT, node: DHTNode, key: str, subkey: str, value: bytes, expiration: float) -> bool:
    # runs inside the DHT process: module-level, so that it pickles
    return bool(await node.store(key, value, expiration, subkey=subkey))
