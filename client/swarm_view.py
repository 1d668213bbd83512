"""A snapshot of who serves a model: DHT records, each node probed for RTT, and the coverage gaps."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from ..models.checkpoint import resolve
from ..models.families import num_blocks
from ..protocol.dht_network import find_servers, start_dht
from ..protocol.identity import Identity
from .discovery import probe
from .routing import block_ranges
from .transport import NodeClient


@dataclass(frozen=True)
class ServerView:
    peer_id: str
    address: str
    start: int
    end: int
    state: str
    throughput: float
    cache_bytes_free: int
    version: str
    rtt: float | None  # None: unreachable or signed by a key other than its record's


@dataclass(frozen=True)
class SwarmView:
    model: str
    revision: str
    total_blocks: int
    servers: list[ServerView]
    missing: list[int]  # blocks no online node serves

    @property
    def missing_ranges(self) -> str:
        return block_ranges(self.missing)


async def swarm_view(model: str, initial_peers: Sequence[str]) -> SwarmView:
    ckpt = await asyncio.to_thread(resolve, model)
    total = num_blocks(ckpt)
    dht = await asyncio.to_thread(start_dht, list(initial_peers), client_mode=True)
    try:
        servers = await find_servers(dht, ckpt.name, total, return_future=True)
    finally:
        await asyncio.to_thread(dht.shutdown)
    records = sorted({r.peer_id: r for rs in servers.values() for r in rs}.values(), key=lambda r: (r.start, r.peer_id))
    identity = Identity.generate()  # a look costs no identity on disk
    clients = [NodeClient(r.address, identity, r.public_key) for r in records]
    probes = await asyncio.gather(*(probe(c) for c in clients))
    for c in clients:
        await c.close()
    views = [
        ServerView(r.peer_id, r.address, r.start, r.end, r.state, r.throughput, r.cache_bytes_free, r.version,
                   rtt if info is not None else None)
        for r, (info, rtt) in zip(records, probes)
    ]  # fmt: skip
    covered = {b for v in views if v.state == "online" and v.rtt is not None for b in range(v.start, v.end)}
    return SwarmView(ckpt.name, ckpt.revision, total, views, [b for b in range(total) if b not in covered])
