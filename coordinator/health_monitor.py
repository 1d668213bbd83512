"""The health monitor: every few seconds, read the DHT, probe every node, and compute the swarm's state.

A scan first reads the DHT model index (protocol/dht/model_index.py): every model some node serves, with
its family and block count. It watches all of them (and, for an hour, models whose nodes all left, shown
as not ready), or only those named by `models` (a filter). Then, for each watched model:
  1. looks up the DHT records of blocks 0..N-1 (N = the model's block count; while it is unknown, the
     count the index announces, else a window of `window` blocks, in batches), one record per peer (the latest);
  2. probes every node with a signed `Info` call that must be signed by the key its record names, and
     measures the round trip;
  3. learns N from healthy nodes (the `total_blocks` of their records, else of their Info; the most
     common value wins, so one lying node cannot stretch the model), looks up the blocks beyond the
     first window if N turned out larger, and computes each block's coverage.

  4. measures each healthy node itself (`speed_probe`): a signed one-token `Forward` over its whole span,
     timed less the Info round trip, as a moving average over scans. A node's announced throughput is a
     claim; the state shows the claim and the measurement side by side, and `overclaims` flags a node whose
     pass takes more than OVERCLAIM_GAP times what its claim promises (plus OVERCLAIM_SLACK_S).

Nodes whose records expire are simply not found any more and vanish from the state; a node that is
unreachable, answers with a key other than its record's, or whose Info contradicts its record stays in
the state, marked unhealthy with the reason, and does not count towards coverage. `state` always holds
the last complete scan, so readers (the web app) never see half of one; `history` keeps a sample of
every scan over the last hour, for the dashboard's charts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict

import hivemind
import torch
from hivemind.utils.timed_storage import get_dht_time

from ..protocol.dht.coverage import block_ranges, coverage
from ..protocol.dht.fraud_reports import FraudReport, find_reports
from ..protocol.dht.model_index import IndexedModel, find_models, group_by_model
from ..protocol.dht.network import find_blocks, start_dht
from ..protocol.dht.records import MAX_BLOCKS, ServerRecord, latest_per_peer, validate_model_name
from ..protocol.version import __version__, protocol, protocol_major
from ..protocol.wire.grpc_node import GrpcNodeClient
from ..protocol.wire.identity import Identity
from ..protocol.wire.node_client import NodeClient, NodeError, NodeInfo, Probe, probe
from .evidence_store import EvidenceStore
from .history import DEFAULT_WINDOW, History
from .state_schema import BlockState, EvidenceState, ModelState, NodeState, SwarmState
from .volunteers import VolunteerLedger

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what `torchnode join default` announces (checkpoint.resolve)
DEFAULT_REFRESH = 5.0
DEFAULT_PROBE_TIMEOUT = 3.0
DISCOVERY_WINDOW = 128  # blocks looked up while a model's block count is unknown
LOOKUP_BATCH = 32  # DHT keys per get_many
LOOKUP_TIMEOUT = 30.0  # seconds for all DHT lookups of one model in one scan
OVERCLAIM_GAP = 4.0  # a measured pass this many times slower than the claim promises flags the node...
OVERCLAIM_SLACK_S = 0.05  # ...beyond this many seconds (the wire's own cost, which a claim does not include)
MEASURE_WEIGHT = 0.3  # weight of the newest probe pass in a node's measured speed


def model_name(model: str) -> str:
    """The name the swarm uses for `model`: 'default' means the embedded model; others are taken as is."""
    return DEFAULT_MODEL_NAME if model == "default" else validate_model_name(model)


class HealthMonitor:
    """Owns nothing but gRPC channels: the caller starts the DHT, calls `run_forever`, then `close`."""

    def __init__(
        self,
        dht: hivemind.DHT,
        models: Sequence[str] = (),
        refresh: float = DEFAULT_REFRESH,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
        window: int = DISCOVERY_WINDOW,
        dht_maddrs: Sequence[str] = (),
        history_window: float = DEFAULT_WINDOW,
        insecure: bool = False,
        speed_probe: bool = True,
        evidence: EvidenceStore | None = None,
        volunteers: VolunteerLedger | None = None,
    ):
        """`models`: names to watch, a filter; empty: every model in the DHT model index. `speed_probe`: time a
        one-token pass through every healthy node each scan (its measured speed beside its claim). `evidence`:
        uploaded fraud proofs and their re-checks (coordinator/evidence_store.py), shown per node. `volunteers`: the
        ledger that credits nodes for what they served (coordinator/volunteers.py); default: in memory."""
        self.evidence = evidence
        if refresh <= 0 or probe_timeout <= 0:
            raise ValueError("refresh and probe_timeout must be positive")
        self.dht, self.refresh, self.probe_timeout = dht, refresh, probe_timeout
        self.insecure = insecure  # probe over plaintext (--insecure): only nodes started with --insecure answer
        self.filter = list(dict.fromkeys(model_name(m) for m in models))
        self.models = list(self.filter)  # the models of the last scan
        self.window = min(window, MAX_BLOCKS)
        self.identity = Identity.generate()  # probing needs a signature, not a reputation: no key on disk
        self.total: dict[str, int] = {}  # block count per model learned from healthy nodes; absent = unknown
        self.history = History(history_window)
        self.volunteers = volunteers or VolunteerLedger()
        self.first_seen: dict[tuple[str, str], float] = {}  # (model, peer id) -> unix time
        self.speed_probe = speed_probe
        self.measured: dict[tuple[str, str], float] = {}  # (model, peer id) -> seconds per one-token pass, averaged
        self.clients: dict[tuple[str, bytes], NodeClient] = {}  # (address, expected key) -> channel
        self.state = SwarmState(
            generated_at=0.0,
            refresh_s=refresh,
            scan_duration_s=0.0,
            monitor_version=__version__,
            dht_maddrs=list(dht_maddrs),
            models=[build_model_state(m, 0, False, []) for m in self.models],
        )
        self.scans = 0

    async def run_forever(self) -> None:
        while True:
            started = time.monotonic()
            await self.scan()
            await asyncio.sleep(max(0.0, self.refresh - (time.monotonic() - started)))

    async def scan(self) -> SwarmState:
        """One refresh of `state`; a failed scan keeps the previous models and says why in `error`."""
        started = time.monotonic()
        used: set[tuple[str, bytes]] = set()
        try:
            entries = await asyncio.wait_for(find_models(self.dht, return_future=True), LOOKUP_TIMEOUT)
            index = group_by_model(entries)
            names = self.filter or sorted(set(index) | set(self.history.recent_models()))
            models = await asyncio.gather(*(self._scan_model(m, index.get(m), used) for m in names))
        except Exception as e:  # the DHT is best effort; the next scan tries again
            log.warning("scan failed: %r", e)
            error = f"scan failed: {type(e).__name__}: {e}"
            self.state = self.state.model_copy(update={"error": error, "generated_at": time.time()})
            return self.state
        for key in set(self.clients) - used:  # nodes that left: close their channels
            await self.clients.pop(key).close()
        self.scans += 1
        self.models = names
        self.history.record(models)
        self.volunteers.record((n for m in models for n in m.nodes), time.time())
        self.state = SwarmState(
            generated_at=time.time(),
            refresh_s=self.refresh,
            scan_duration_s=time.monotonic() - started,
            monitor_version=__version__,
            dht_maddrs=self.state.dht_maddrs,
            models=models,
        )
        return self.state

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        self.clients.clear()

    # ---- one model
    async def _scan_model(self, model: str, indexed: IndexedModel | None, used: set[tuple[str, bytes]]) -> ModelState:
        scanned = self.total.get(model) or (indexed.total_blocks if indexed else 0) or self.window
        records = await self._lookup(model, range(scanned))
        probes = await self._probe_all(records, used)
        total, known = self._learn_total(model, records, probes)
        if total > scanned:  # the first window was too short: look up (and probe) the rest now
            more = {p: r for p, r in (await self._lookup(model, range(scanned, total))).items() if p not in records}
            probes |= await self._probe_all(more, used)
            records |= more
            total, known = self._learn_total(model, records, probes)
        reports = await self._reports(records)
        if self.speed_probe:
            await self._measure_all(records, probes)
        now, dht_now = time.time(), get_dht_time()
        seen = {(model, peer) for peer in records}
        for key in [k for k in self.first_seen if k[0] == model and k not in seen]:
            del self.first_seen[key]  # a node that comes back later starts a new uptime
            self.measured.pop(key, None)
        nodes = [
            self._node_state(records[peer], probes[peer], now, dht_now, reports.get(peer, ()))
            for peer in sorted(records, key=lambda p: (records[p].start, records[p].end, p))
        ]
        return build_model_state(model, total, known, nodes, indexed)

    async def _lookup(self, model: str, blocks: range) -> dict[str, ServerRecord]:
        """{peer id: its record with the latest expiration} over `blocks`, looked up in batches."""
        batches = [blocks[i : i + LOOKUP_BATCH] for i in range(0, len(blocks), LOOKUP_BATCH)]
        lookups = asyncio.gather(*(find_blocks(self.dht, model, b, return_future=True) for b in batches))
        found = await asyncio.wait_for(lookups, LOOKUP_TIMEOUT)
        return latest_per_peer({b: rs for servers in found for b, rs in servers.items()})

    async def _reports(self, records: dict[str, ServerRecord]) -> dict[str, list[FraudReport]]:
        """Fraud reports naming each node, in one batched lookup; best effort (none shown if it fails)."""
        try:
            return await asyncio.wait_for(find_reports(self.dht, records, return_future=True), LOOKUP_TIMEOUT)
        except Exception as e:  # reports are extra information: a failed lookup must not fail the scan
            log.warning("looking up fraud reports failed: %r", e)
            return {}

    async def _probe_all(self, records: dict[str, ServerRecord], used: set) -> dict[str, Probe]:
        peers = list(records)
        probes = await asyncio.gather(*(self._probe(records[p], used) for p in peers))
        return dict(zip(peers, probes, strict=True))

    async def _probe(self, record: ServerRecord, used: set[tuple[str, bytes]]) -> Probe:
        key = (record.address, record.public_key)  # the reply must be signed by the record's key
        used.add(key)
        if key not in self.clients:
            self.clients[key] = GrpcNodeClient(record.address, self.identity, record.public_key, insecure=self.insecure)
        return await probe(self.clients[key], self.probe_timeout)

    async def _measure_all(self, records: dict[str, ServerRecord], probes: dict[str, Probe]) -> None:
        """One timed one-token pass through every healthy node's whole span, all at once."""
        healthy = [p for p in records if _health(records[p], probes[p])[0] == "healthy"]
        await asyncio.gather(*(self._measure(records[p], probes[p]) for p in healthy))

    async def _measure(self, record: ServerRecord, probe: Probe) -> None:
        info, client = probe.info, self.clients[record.address, record.public_key]
        x = torch.zeros(1, 1, info.hidden_size)  # (B, T, H): one token, fp32 on the wire
        started = time.perf_counter()
        try:
            await client.train_forward(x, info.start_block, info.end_block, {}, 1.0, self.probe_timeout)
        except (NodeError, NotImplementedError) as e:  # not measured this scan; Info decides health
            log.info("speed probe of %s failed: %s", record.address, e)
            return
        seconds = max(time.perf_counter() - started - (probe.rtt or 0.0), 1e-6)
        key = (record.model, record.peer_id)
        old = self.measured.get(key)
        self.measured[key] = seconds if old is None else (1 - MEASURE_WEIGHT) * old + MEASURE_WEIGHT * seconds

    def _learn_total(self, model: str, records: dict[str, ServerRecord], probes: dict[str, Probe]) -> tuple[int, bool]:
        """(block count, whether a healthy node said it). Votes of healthy nodes only; the most common
        value wins (ties: the larger). With no healthy node this scan, the last count learned stays."""
        votes = Counter()
        for peer, record in records.items():
            probe = probes[peer]
            if probe.info is not None and not _problems(record, probe.info):
                votes[record.total_blocks or probe.info.total_blocks] += 1
        if votes:
            self.total[model] = max(votes, key=lambda n: (votes[n], n))
        if self.total.get(model):
            return self.total[model], True
        return max((r.end for r in records.values()), default=0), False  # a lower bound only

    def _node_state(
        self, record: ServerRecord, probe: Probe, now: float, dht_now: float, reports: Sequence[FraudReport] = ()
    ) -> NodeState:
        first_seen = self.first_seen.setdefault((record.model, record.peer_id), now)
        info = probe.info
        health, problem = _health(record, probe)
        live = info if health == "healthy" else None  # an unhealthy node's Info is not to be believed
        claimed = live.throughput if live else record.throughput
        pass_s = self.measured.get((record.model, record.peer_id))
        overclaims = pass_s is not None and pass_s > OVERCLAIM_GAP / max(claimed, 1e-9) + OVERCLAIM_SLACK_S
        return NodeState(
            peer_id=record.peer_id,
            short_id=record.peer_id[:12],
            public_key=record.public_key.hex(),
            address=record.address,
            relay=record.relay,
            model=record.model,
            revision=record.revision,
            start=record.start,
            end=record.end,
            state=record.state,
            health=health,
            problem=problem,
            encrypted=getattr(self.clients.get((record.address, record.public_key)), "encrypted", None),
            throughput=claimed,
            measured_throughput=1 / pass_s if pass_s is not None else None,
            overclaims=overclaims,
            rtt_ms=probe.rtt * 1000 if probe.rtt is not None else None,
            cache_bytes_free=live.cache_bytes_free if live else record.cache_bytes_free,
            sessions_free=live.sessions_free if live else None,
            dtype=live.dtype if live else None,
            batch_size=live.batch_size if live else None,
            queue_length=live.queue_length if live else None,
            version=record.version,
            protocol=record.protocol,
            outdated=protocol_major(record.protocol) < protocol_major(protocol()),
            newer=protocol_major(record.protocol) > protocol_major(protocol()),
            total_blocks=record.total_blocks or (live.total_blocks if live else 0),
            first_seen=first_seen,
            uptime_s=max(0.0, now - first_seen),
            expires_in_s=max(0.0, record.expiration - dht_now),
            reports=len(reports),
            report_evidence=sorted({r.evidence_sha256 for r in reports}),
            **self._proofs(record.peer_id),
            public_name=record.public_name,
            contact=record.contact,
            served_tokens=record.served_tokens,
            served_sessions=record.served_sessions,
            node_uptime_s=record.uptime,
        )

    def _proofs(self, peer_id: str) -> dict:
        """The node's uploaded fraud proofs; only those re-checked as proven mark it dishonest."""
        found = self.evidence.about(peer_id) if self.evidence is not None else []
        proven = sum(e.status == "proven" for e in found)
        return dict(proven_reports=proven, dishonest=proven > 0, evidence=[EvidenceState(**asdict(e)) for e in found])


async def scan_once(
    initial_peers: Sequence[str],
    models: Sequence[str] = (),
    insecure: bool = False,
    allow_keys: frozenset[bytes] | None = None,
) -> SwarmState:
    """One scan from a fresh DHT client (`torchnode models`, `torchnode swarm`): what the dashboard would
    show right now. Needs no weights: model names and block counts come from the DHT."""
    dht = await asyncio.to_thread(start_dht, list(initial_peers), client_mode=True, allow_keys=allow_keys)
    monitor = HealthMonitor(dht, models, insecure=insecure)
    try:
        return await monitor.scan()
    finally:
        await monitor.close()
        await asyncio.to_thread(dht.shutdown)


def _health(record: ServerRecord, probe: Probe) -> tuple[str, str | None]:
    if probe.info is None:
        error = probe.error
        if record.state == "joining" and error.status == "UNAVAILABLE":
            return "starting", "announced 'joining': not serving yet"
        if error.status == "DEADLINE_EXCEEDED":
            return "unhealthy", "Info: no answer in time"
        return "unhealthy", f"Info: {str(error).removeprefix(record.address + ': ')}"
    problems = _problems(record, probe.info)
    return ("unhealthy", "; ".join(problems)) if problems else ("healthy", None)


def _problems(record: ServerRecord, info: NodeInfo) -> list[str]:
    """Where a validly signed Info contradicts the node's own DHT record."""
    problems = []
    if info.model != record.model:
        problems.append(f"Info says model {info.model!r}, its record {record.model!r}")
    if info.revision != record.revision:
        problems.append(f"Info says revision {info.revision[:12]!r}, its record {record.revision[:12]!r}")
    if (info.start_block, info.end_block) != (record.start, record.end):
        problems.append(f"Info says blocks {info.start_block}:{info.end_block}, its record {record.start}:{record.end}")
    if not info.end_block <= info.total_blocks <= MAX_BLOCKS:
        problems.append(f"Info says total_blocks {info.total_blocks}, below its span's end or too large")
    elif record.total_blocks and info.total_blocks != record.total_blocks:
        problems.append(f"Info says total_blocks {info.total_blocks}, its record {record.total_blocks}")
    return problems


def build_model_state(
    model: str, total: int, known: bool, nodes: list[NodeState], indexed: IndexedModel | None = None
) -> ModelState:
    serving = [n for n in nodes if n.health == "healthy" and n.state == "online" and not (n.outdated or n.newer)]
    cov = coverage([(n.start, n.end, n.throughput) for n in serving], total)
    blocks = [
        BlockState(
            block=b, servers=n, throughput=tps, coverage="uncovered" if not n else "single" if n == 1 else "replicated"
        )
        for b, (n, tps) in enumerate(zip(cov.servers, cov.throughput, strict=True))
    ]
    missing = cov.missing
    ready_revision = None
    if known and total and not missing:
        by_count = Counter(n.revision for n in serving)
        for revision, _ in by_count.most_common():  # a client's chain must be of one checkpoint
            covered = {b for n in serving if n.revision == revision for b in range(n.start, min(n.end, total))}
            if len(covered) == total:
                ready_revision = revision
                break
    index_fields = {}
    if indexed is not None:
        index_fields = dict(
            family=", ".join(indexed.families),
            revisions=indexed.revisions,
            indexed_nodes=len(indexed.entries),
            adapters=sorted({a for e in indexed.entries for a in e.adapters}),
        )
    return ModelState(
        **index_fields,
        name=model,
        total_blocks=total,
        total_blocks_known=known,
        ready=ready_revision is not None,
        ready_revision=ready_revision,
        missing=missing,
        missing_ranges=block_ranges(missing),
        bottleneck_throughput=min((b.throughput for b in blocks), default=0.0),
        blocks=blocks,
        nodes=nodes,
    )
