"""Keeps a node's signed records fresh in the DHT: joining -> online -> draining, with explicit expiry.

Two records, stored together and with the same expiration: the server record under each block the node
serves, and its model index entry (protocol/dht/model_index.py), which lets dashboards and `torchnode models`
find the model without being told its name. Records are re-stored every `period` seconds with an
absolute expiration `expiration` seconds ahead, so a node that dies without a word vanishes from
lookups, and its model from the index, by itself within `expiration`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

import hivemind
from hivemind.utils.timed_storage import get_dht_time

from ..protocol.dht.model_index import ModelEntry, announce_model
from ..protocol.dht.network import announce
from ..protocol.dht.records import ServerRecord
from ..protocol.wire.identity import Identity
from .config import DEFAULT_EXPIRATION

log = logging.getLogger(__name__)


class Announcer:
    def __init__(
        self,
        dht: hivemind.DHT,
        identity: Identity,
        current: Callable[[], ServerRecord],
        expiration: float = DEFAULT_EXPIRATION,
        family: str = "",
        adapters: Callable[[], tuple[str, ...]] = tuple,
    ):
        """`family`: the checkpoint's transformers model_type; empty: no model index entry (and with it,
        no listing in `torchnode models`). `adapters`: names of the adapters served, for the index."""
        self.dht, self.identity, self.current, self.expiration = dht, identity, current, expiration
        self.family, self.adapters = family, adapters
        self.period = expiration / 3
        self.state = "joining"

    async def announce(self, state: str | None = None) -> None:
        """Stores the current record and index entry now; the DHT keeps the values with the latest expiration."""
        if state is not None:
            self.state = state
        record = replace(self.current(), state=self.state, expiration=get_dht_time() + self.expiration)
        stores = [announce(self.dht, self.identity, record, return_future=True)]
        if self.family and record.total_blocks:
            stores.append(announce_model(self.dht, self.identity, self.entry(record), return_future=True))
        for result in await asyncio.gather(*stores, return_exceptions=True):
            if isinstance(result, Exception):  # the DHT is best effort: a missed refresh is retried next period
                log.warning("announcing to the DHT failed: %s", result)

    def entry(self, record: ServerRecord) -> ModelEntry:
        """The model index entry that goes with `record` (same signer, same expiration)."""
        return ModelEntry(
            peer_id=record.peer_id,
            public_key=record.public_key,
            model=record.model,
            revision=record.revision,
            family=self.family,
            total_blocks=record.total_blocks,
            adapters=tuple(self.adapters()),
            expiration=record.expiration,
        )

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            await self.announce()
