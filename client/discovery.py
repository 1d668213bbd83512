"""Where a client finds nodes: a static list of addresses, or the DHT. Both end in the same probe.

Every candidate is probed with a signed `Info` call: that measures its RTT, proves it holds the key
the client expects (from the DHT record, or pinned on first use for static peers), and tells its span
and current throughput. Nodes serving another revision of the checkpoint are dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import hivemind

from ..protocol.dht_network import find_servers
from ..protocol.dht_records import latest_per_peer
from ..protocol.identity import Identity
from ..protocol.grpc_node import GrpcNodeClient
from ..protocol.node_client import NodeClient, probe
from .routing import Candidate


class PeerSource:
    """Base: subclasses say which NodeClients exist; probing and filtering are shared."""

    def __init__(self, identity: Identity):
        self.identity = identity
        self.clients: dict[tuple[str, bytes | None], NodeClient] = {}

    def client(self, address: str, key: bytes | None = None) -> NodeClient:
        if (address, key) not in self.clients:
            self.clients[address, key] = GrpcNodeClient(address, self.identity, key)
        return self.clients[address, key]

    async def nodes(self, model: str, total_blocks: int) -> list[NodeClient]:
        raise NotImplementedError

    async def candidates(
        self, model: str, revision: str, total_blocks: int, exclude: set[str] = frozenset()
    ) -> list[tuple[Candidate, NodeClient]]:
        """Probed nodes serving exactly this checkpoint; addresses in `exclude` are not even probed."""
        nodes = [n for n in await self.nodes(model, total_blocks) if n.address not in exclude]
        probes = await asyncio.gather(*(probe(n) for n in nodes))
        return [
            (Candidate(node.address, p.info.start_block, p.info.end_block, p.info.throughput, p.rtt), node)
            for node, p in zip(nodes, probes)
            if p.info is not None and p.info.revision == revision and p.info.model == model
        ]

    async def close(self) -> None:
        for node in self.clients.values():
            await node.close()


class StaticPeers(PeerSource):
    def __init__(self, identity: Identity, addresses: Sequence[str], keys: dict[str, bytes] | None = None):
        super().__init__(identity)
        if not addresses:
            raise ValueError("no peers given: pass at least one node address (host:port)")
        self.addresses, self.keys = list(addresses), keys or {}

    async def nodes(self, model: str, total_blocks: int) -> list[NodeClient]:
        return [self.client(a, self.keys.get(a)) for a in self.addresses]


class DhtPeers(PeerSource):
    def __init__(self, identity: Identity, dht: hivemind.DHT):
        super().__init__(identity)
        self.dht = dht

    async def nodes(self, model: str, total_blocks: int) -> list[NodeClient]:
        servers = await find_servers(self.dht, model, total_blocks, return_future=True)
        online = [r for r in latest_per_peer(servers).values() if r.state == "online"]
        return [self.client(r.address, r.public_key) for r in online]

    async def close(self) -> None:
        await super().close()
        await asyncio.to_thread(self.dht.shutdown)
