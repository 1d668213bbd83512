"""Where a client finds nodes: a static list of addresses, or the DHT. Both end in the same probe.

Every candidate is probed with a signed `Info` call: that measures its RTT, proves it holds the key
the client expects (from the DHT record, or pinned on first use for static peers), and tells its span
and current throughput. Nodes serving another revision of the checkpoint are dropped, and so are nodes of
another protocol major (their DHT record, or their Info, says which): those are kept in `unspoken`, so that
when no route is left the client can say who serves the missing blocks and which side must upgrade.

Probes run at once, and the client does not wait for stragglers: once the nodes that answered cover every
block, the rest get `probe_grace` seconds more and are then left out of this route (a flood of records
naming addresses that never answer must not hold every client for a whole probe timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import hivemind

from ..protocol.dht.coverage import block_ranges
from ..protocol.dht.fraud_reports import FraudReport, publish_report
from ..protocol.dht.network import find_servers
from ..protocol.dht.records import latest_per_peer
from ..protocol.version import protocol, protocol_major, speaks, upgrade_advice
from ..protocol.wire.grpc_node import GrpcNodeClient
from ..protocol.wire.identity import Identity
from ..protocol.wire.node_client import NodeClient, NodeError, Probe, probe
from .precision import Precision
from .routing import Candidate, NoRouteError

log = logging.getLogger(__name__)

REPORT_STORE_TIMEOUT = 10.0  # seconds `close` waits for fraud reports still being stored
DEFAULT_PROBE_GRACE = 1.0  # seconds unanswered probes still get once the answered ones cover every block


@dataclass(frozen=True)
class Unspoken:
    """A node skipped because it speaks another protocol major."""

    address: str
    start: int
    end: int
    protocol: str


def unspoken_route_error(error: NoRouteError, skipped: Sequence[Unspoken]) -> NoRouteError:
    """`error` again, or, when skipped nodes serve some of its missing blocks, an error that says so:
    `no route: 2 nodes serve blocks 0:15 but speak protocol 3, this client speaks 2: upgrade`."""
    missing = set(error.missing)
    serving = [s for s in skipped if missing.intersection(range(s.start, s.end))]
    if not serving:
        return error
    blocks = block_ranges(sorted(missing.intersection(b for s in serving for b in range(s.start, s.end))))
    majors = sorted({protocol_major(s.protocol) for s in serving})
    nodes, speak = ("1 node serves", "speaks") if len(serving) == 1 else (f"{len(serving)} nodes serve", "speak")
    theirs = ", ".join(map(str, majors))
    advice = upgrade_advice(max((s.protocol for s in serving), key=protocol_major), protocol(), "they")
    explained = NoRouteError(error.missing, error.total)
    explained.args = (
        f"no route: {nodes} blocks {blocks} but {speak} protocol {theirs}, "
        f"this client speaks {protocol_major(protocol())}: {advice}",
    )
    return explained


class PeerSource:
    """Base: subclasses say which NodeClients exist; probing and filtering are shared."""

    allow_keys: frozenset[bytes] | None = None  # private swarm (--allow-keys): use only nodes with these keys
    probe_grace: float = DEFAULT_PROBE_GRACE  # see the module's docstring

    def __init__(self, identity: Identity, insecure: bool = False):
        self.identity, self.insecure = identity, insecure  # insecure: plaintext channels (--insecure)
        self.clients: dict[tuple[str, bytes | None], NodeClient] = {}
        self.reported: dict[str, str] = {}  # address -> the last probe failure logged for it
        self.relayed: set[str] = set()  # addresses that are relays' ports for nodes behind a NAT (records say)
        self.unspoken: dict[str, Unspoken] = {}  # address -> a node of another protocol major (last lookup)

    def client(self, address: str, key: bytes | None = None) -> NodeClient:
        if (address, key) not in self.clients:
            self.clients[address, key] = GrpcNodeClient(address, self.identity, key, insecure=self.insecure)
        return self.clients[address, key]

    async def nodes(self, model: str, total_blocks: int) -> list[NodeClient]:
        raise NotImplementedError

    async def candidates(
        self,
        model: str,
        revision: str,
        total_blocks: int,
        exclude: AbstractSet[str] = frozenset(),
        adapter: str | None = None,
        precision: Callable[[Precision], bool] = lambda _: True,
    ) -> list[tuple[Candidate, NodeClient]]:
        """Probed nodes serving exactly this checkpoint (and `adapter`, if named, as their Info says) in a
        `precision` that suits the caller (client/precision.py); addresses in `exclude` are not even probed;
        nodes of another protocol major end in `unspoken`."""
        self.unspoken = {}
        nodes = [n for n in await self.nodes(model, total_blocks) if n.address not in exclude]
        probes = await self._probe_all(nodes, total_blocks)
        for p in probes:  # why a node is skipped (not encrypted, a man in the middle, down), once per reason
            if p.error is not None and self.reported.get(p.error.address) != str(p.error):
                self.reported[p.error.address] = str(p.error)
                log.warning("skipping node %s", p.error)
        for node, p in zip(nodes, probes, strict=True):
            if p.info is not None and not speaks(p.info.protocol):  # static peers: only their Info says it
                self.unspoken[node.address] = Unspoken(
                    node.address, p.info.start_block, p.info.end_block, p.info.protocol
                )
        return [
            (
                Candidate(
                    node.address,
                    p.info.start_block,
                    p.info.end_block,
                    p.info.throughput,
                    p.rtt,
                    relayed=node.address in self.relayed,
                    adapters=tuple(p.info.adapters),
                ),
                node,
            )
            for node, p in zip(nodes, probes, strict=True)
            if p.info is not None
            and p.rtt is not None
            and p.info.revision == revision
            and p.info.model == model
            and (self.allow_keys is None or p.info.public_key in self.allow_keys)
            and (not adapter or adapter in p.info.adapters)
            and node.address not in self.unspoken
            and precision(Precision.of(p.info))
        ]

    async def _probe_all(self, nodes: list[NodeClient], total_blocks: int) -> list[Probe]:
        """Probes of `nodes`, in order; those still unanswered `probe_grace` seconds after the answered ones
        covered blocks [0, total_blocks) are given up (an error Probe)."""
        tasks = [asyncio.ensure_future(probe(n)) for n in nodes]
        pending, covered_at = set(tasks), None
        while pending:
            wait = None if covered_at is None else covered_at + self.probe_grace - time.monotonic()
            if wait is not None and wait <= 0:
                break
            _, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if covered_at is None and _covers([t.result() for t in tasks if t.done()], total_blocks):
                covered_at = time.monotonic()
        for task in pending:
            task.cancel()
        if pending:
            log.info("%d nodes did not answer within %.1f s of a full route; left out", len(pending), self.probe_grace)
        late = f"no answer within {self.probe_grace:.1f} s of the others"
        return [
            t.result() if t.done() and not t.cancelled() else Probe(None, None, NodeError(n.address, late))
            for t, n in zip(tasks, nodes, strict=True)
        ]

    def publish(self, report: FraudReport | None) -> None:
        """Tells the swarm about a liar (a signed DHT report); fixed peers have no DHT to tell."""

    async def close(self) -> None:
        for node in self.clients.values():
            await node.close()


class StaticPeers(PeerSource):
    def __init__(
        self, identity: Identity, addresses: Sequence[str], keys: dict[str, bytes] | None = None, insecure: bool = False
    ):
        super().__init__(identity, insecure)
        if not addresses:
            raise ValueError("no peers given: pass at least one node address (host:port)")
        self.addresses, self.keys = list(addresses), keys or {}

    async def nodes(self, model: str, total_blocks: int) -> list[NodeClient]:
        return [self.client(a, self.keys.get(a)) for a in self.addresses]


class DhtPeers(PeerSource):
    def __init__(self, identity: Identity, dht: hivemind.DHT, insecure: bool = False):
        super().__init__(identity, insecure)
        self.dht = dht
        self.reports: list = []  # stores in flight (hivemind MPFutures), awaited on close

    async def nodes(self, model: str, total_blocks: int) -> list[NodeClient]:
        servers = await find_servers(self.dht, model, total_blocks, return_future=True)
        online = [r for r in latest_per_peer(servers).values() if r.state == "online"]
        for r in online:
            if not speaks(r.protocol):  # not even probed: its Info may be of another shape
                self.unspoken[r.address] = Unspoken(r.address, r.start, r.end, r.protocol)
        online = [r for r in online if r.address not in self.unspoken]
        self.relayed |= {r.address for r in online if r.relay}
        return [self.client(r.address, r.public_key) for r in online]

    def publish(self, report: FraudReport | None) -> None:
        """Stores the report in the background (best effort, as every DHT store); `close` waits for it."""
        if report is not None:
            self.reports.append(publish_report(self.dht, self.identity, report, return_future=True))

    async def close(self) -> None:
        await super().close()
        if self.reports:
            try:
                pending = asyncio.gather(*self.reports, return_exceptions=True)
                results = await asyncio.wait_for(pending, REPORT_STORE_TIMEOUT)
            except TimeoutError:
                results = [f"no answer in {REPORT_STORE_TIMEOUT:.0f} s"]
            failed = [r for r in results if r is not True]
            if failed:
                log.warning(
                    "fraud reports not stored in the DHT (%d of %d): %s", len(failed), len(self.reports), failed
                )
        await asyncio.to_thread(self.dht.shutdown)


def _covers(answered: list[Probe], total_blocks: int) -> bool:
    """Whether the nodes that answered serve every block of [0, total_blocks) between them."""
    served = {b for p in answered if p.info is not None for b in range(p.info.start_block, p.info.end_block)}
    return served >= set(range(total_blocks))
