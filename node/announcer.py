"""Keeps a node's signed record fresh in the DHT: joining -> online -> draining, with explicit expiry.

Records are re-stored every `period` seconds with an absolute expiration `expiration` seconds ahead, so
a node that dies without a word vanishes from lookups by itself within `expiration`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

import hivemind
from hivemind.utils.timed_storage import get_dht_time

from ..protocol.dht_network import announce
from ..protocol.dht_records import ServerRecord
from ..protocol.identity import Identity

log = logging.getLogger(__name__)

DEFAULT_EXPIRATION = 30.0


class Announcer:
    def __init__(
        self,
        dht: hivemind.DHT,
        identity: Identity,
        current: Callable[[], ServerRecord],
        expiration: float = DEFAULT_EXPIRATION,
    ):
        self.dht, self.identity, self.current, self.expiration = dht, identity, current, expiration
        self.period = expiration / 3
        self.state = "joining"

    async def announce(self, state: str | None = None) -> None:
        """Stores the current record now; the DHT keeps the value with the latest expiration."""
        if state is not None:
            self.state = state
        record = replace(self.current(), state=self.state, expiration=get_dht_time() + self.expiration)
        try:
            await announce(self.dht, self.identity, record, return_future=True)
        except Exception as e:  # the DHT is best effort: a missed refresh is retried next period
            log.warning("announcing to the DHT failed: %s", e)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            await self.announce()
