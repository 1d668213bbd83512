"""The dashboard's web app: the page, its JSON, and Prometheus metrics, all read from one state source.

    GET /               the swarm dashboard (one self-contained HTML file; it polls /api/v1/state). Pages
                        by URL fragment: #/ every model, #/model/NAME one model, #/node/PEER_ID one node
    GET /api/v1/state   `SwarmState` as JSON (its schema: /openapi.json)
    GET /api/v1/history?model=NAME   the model's samples over the last hour, for charts
    GET /api/v1/nodes/{peer_id}      one node now, and its throughput and RTT over the last hour
    POST /api/v1/evidence            a fraud proof's file (raw bytes), uploaded by the client that caught a
                                     node; 201 with its state (coordinator/evidence_store.py), 413 too large,
                                     400 not an evidence file, 503 too many waiting for a re-check
    GET /api/v1/evidence             every proof held, with its status (proven, not proven, invalid, ...)
    GET /api/v1/evidence/{sha256}    the file itself, for anyone to re-check (torchnode check-evidence)
    GET /api/v1/volunteers           credit: per volunteer name and node, tokens served over time (volunteers.py)
    GET /metrics        Prometheus text format
    GET /healthz        "ok": the monitor process is up

The app knows nothing of the DHT or of gRPC: it only reads `source.state` and `source.history`, so it
is tested with a hand-made state and served by `dashboard.py` next to a live `HealthMonitor`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..protocol.version import __version__
from .evidence_store import EvidenceRejected, EvidenceStore
from .history import History
from .state_schema import EvidenceState, ModelHistory, NodeDetail, SwarmState
from .volunteers import VolunteerLedger, VolunteersState

PAGE = Path(__file__).parent / "static" / "dashboard.html"


class StateSource(Protocol):
    @property
    def state(self) -> SwarmState: ...

    @property
    def history(self) -> History: ...

    @property
    def volunteers(self) -> VolunteerLedger: ...


def create_app(source: StateSource, chat_url: str | None = None) -> FastAPI:
    """chat_url: a `torchnode api` chat page (`--chat-url`) the page links every ready model to."""
    page = PAGE.read_text(encoding="utf-8")  # read once: a broken install fails at start, not per request
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StateCollector(source))
    app = FastAPI(
        title="torchnode swarm dashboard",
        version=__version__,
        description="Which nodes serve which blocks of which model, their health, and whether a client can "
        "generate. Read from the DHT and from signed Info probes every few seconds.",
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN; /openapi.json stays
        redoc_url=None,
    )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/api/v1/links", summary="Where the page links to: the chat page (--chat-url), or null")
    def links() -> dict:
        return {"chat_url": chat_url}

    @app.get(
        "/api/v1/volunteers",
        response_model=VolunteersState,
        summary="Who serves the swarm: tokens served, sessions, uptime per volunteer name and node, over time",
    )
    def volunteers() -> VolunteersState:
        return source.volunteers.state(time.time())

    @app.get("/api/v1/state", response_model=SwarmState, summary="The swarm's current state, model by model")
    def state() -> SwarmState:
        return source.state

    @app.get("/api/v1/history", response_model=ModelHistory, summary="A model's samples over the last hour")
    def history(model: str = Query(description="model name, as in /api/v1/state")) -> ModelHistory:
        samples = source.history.model(model)
        if not samples and all(m.name != model for m in source.state.models):
            raise HTTPException(404, f"no model {model!r} in the swarm's state or history")
        return ModelHistory(model=model, window_s=source.history.window, samples=samples)

    @app.get("/api/v1/nodes/{peer_id}", response_model=NodeDetail, summary="One node now and over the last hour")
    def node(peer_id: str) -> NodeDetail:
        found = next((n for m in source.state.models for n in m.nodes if n.peer_id == peer_id), None)
        if found is None:
            raise HTTPException(404, f"no node with peer id {peer_id!r} in the swarm's state")
        return NodeDetail(node=found, window_s=source.history.window, samples=source.history.node(peer_id))

    def store() -> EvidenceStore:
        evidence = getattr(source, "evidence", None)
        if evidence is None:
            raise HTTPException(404, "this monitor keeps no fraud proofs")
        return evidence

    @app.post("/api/v1/evidence", status_code=201, response_model=EvidenceState, summary="Upload a fraud proof")
    async def upload_evidence(request: Request) -> EvidenceState:
        evidence = store()
        data = bytearray()
        async for chunk in request.stream():  # read no more than the limit, whatever Content-Length says
            data += chunk
            if len(data) > evidence.limits.max_bytes:
                raise HTTPException(413, f"evidence larger than {evidence.limits.max_bytes} bytes")
        try:
            return EvidenceState(**asdict(evidence.add(bytes(data))))
        except EvidenceRejected as e:
            raise HTTPException(e.status, str(e)) from None

    @app.get("/api/v1/evidence", response_model=list[EvidenceState], summary="Fraud proofs held, with their status")
    def list_evidence() -> list[EvidenceState]:
        return [EvidenceState(**asdict(e)) for e in store().entries.values()]

    @app.get("/api/v1/evidence/{sha256}", summary="One fraud proof's file")
    def evidence_file(sha256: str) -> FileResponse:
        evidence = store()
        if sha256 not in evidence.entries:
            raise HTTPException(404, f"no evidence with sha256 {sha256!r} here")
        return FileResponse(evidence.path(sha256), media_type="application/octet-stream")

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", response_class=PlainTextResponse, include_in_schema=False)
    def healthz() -> str:
        return "ok"

    return app


class StateCollector(Collector):
    """Prometheus metrics computed from the state at scrape time (a custom collector: no stale series of
    nodes that left)."""

    def __init__(self, source: StateSource):
        self.source = source

    def collect(self) -> Iterator[Metric]:
        s = self.source.state
        yield _gauge("torchnode_monitor_last_scan_timestamp_seconds", "Unix time of the last scan", s.generated_at)
        yield _gauge("torchnode_monitor_scan_duration_seconds", "Duration of the last scan", s.scan_duration_s)
        yield _gauge("torchnode_monitor_scan_failed", "1 if the last scan failed", float(s.error is not None))

        by_model = ["model"]
        nodes = GaugeMetricFamily(
            "torchnode_nodes", "Nodes with a live DHT record", labels=["model", "state", "health"]
        )
        blocks = GaugeMetricFamily("torchnode_model_blocks", "Blocks in the model", labels=by_model)
        covered = GaugeMetricFamily(
            "torchnode_model_blocks_covered", "Blocks served by a healthy online node", labels=by_model
        )
        replicated = GaugeMetricFamily(
            "torchnode_model_blocks_replicated", "Blocks served by 2+ healthy online nodes", labels=by_model
        )
        ready = GaugeMetricFamily("torchnode_model_ready", "1 if a client can generate", labels=by_model)
        bottleneck = GaugeMetricFamily(
            "torchnode_model_bottleneck_tokens_per_second", "Tokens/s of the weakest block", labels=by_model
        )
        node_labels = ["model", "peer_id", "address"]
        throughput = GaugeMetricFamily("torchnode_node_tokens_per_second", "Node throughput", labels=node_labels)
        healthy = GaugeMetricFamily("torchnode_node_healthy", "1 if the node is healthy", labels=node_labels)
        rtt = GaugeMetricFamily("torchnode_node_rtt_seconds", "Round trip of a signed Info call", labels=node_labels)
        cache = GaugeMetricFamily("torchnode_node_cache_bytes_free", "KV cache memory left", labels=node_labels)
        uptime = GaugeMetricFamily("torchnode_node_uptime_seconds", "Seconds since first seen", labels=node_labels)
        batch = GaugeMetricFamily(
            "torchnode_node_batch_size", "Sequences in the node's latest batch", labels=node_labels
        )
        queue = GaugeMetricFamily(
            "torchnode_node_queue_length", "Steps waiting for the node's next batch", labels=node_labels
        )
        reports = GaugeMetricFamily(
            "torchnode_node_fraud_reports",
            "Signed fraud reports in the DHT naming the node (claims)",
            labels=node_labels,
        )
        proven = GaugeMetricFamily(
            "torchnode_node_proven_fraud_reports",
            "Fraud proofs about the node this monitor re-checked and found proven",
            labels=node_labels,
        )
        for m in s.models:
            counts = Counter((n.state, n.health) for n in m.nodes)
            for (state, health), count in sorted(counts.items()):
                nodes.add_metric([m.name, state, health], count)
            blocks.add_metric([m.name], m.total_blocks)
            covered.add_metric([m.name], sum(b.servers > 0 for b in m.blocks))
            replicated.add_metric([m.name], sum(b.servers > 1 for b in m.blocks))
            ready.add_metric([m.name], float(m.ready))
            bottleneck.add_metric([m.name], m.bottleneck_throughput)
            for n in m.nodes:
                labels = [m.name, n.peer_id, n.address]
                throughput.add_metric(labels, n.throughput)
                healthy.add_metric(labels, float(n.health == "healthy"))
                cache.add_metric(labels, n.cache_bytes_free)
                uptime.add_metric(labels, n.uptime_s)
                reports.add_metric(labels, n.reports)
                proven.add_metric(labels, n.proven_reports)
                if n.rtt_ms is not None:
                    rtt.add_metric(labels, n.rtt_ms / 1000)
                if n.batch_size is not None:
                    batch.add_metric(labels, n.batch_size)
                    queue.add_metric(labels, n.queue_length)
        yield from (nodes, blocks, covered, replicated, ready, bottleneck, throughput, healthy, rtt, cache, uptime)
        yield from (batch, queue, reports, proven)
        yield from _credit_metrics(self.source.volunteers.state(time.time()))


def _credit_metrics(v: VolunteersState) -> Iterator[Metric]:
    """Counters of credited work (volunteers.py): per node (with its volunteer name) and per name."""
    labels = ["peer_id", "name"]
    tokens = CounterMetricFamily("torchnode_node_served_tokens", "Tokens credited to the node", labels=labels)
    sessions = CounterMetricFamily("torchnode_node_served_sessions", "Sessions credited to the node", labels=labels)
    up = CounterMetricFamily("torchnode_node_credited_uptime_seconds", "Healthy online time watched", labels=labels)
    by_name = CounterMetricFamily(
        "torchnode_volunteer_served_tokens", "Tokens credited per volunteer name (named volunteers)", labels=["name"]
    )
    for volunteer in v.volunteers:
        for n in volunteer.nodes:
            tokens.add_metric([n.peer_id, volunteer.name], n.tokens)
            sessions.add_metric([n.peer_id, volunteer.name], n.sessions)
            up.add_metric([n.peer_id, volunteer.name], n.uptime_s)
        if volunteer.name:
            by_name.add_metric([volunteer.name], volunteer.tokens)
    yield from (tokens, sessions, up, by_name)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
