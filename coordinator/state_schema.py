"""The JSON of `/api/v1/state`: what the health monitor knows about the swarm, model by model.

These pydantic models are the documented schema: FastAPI serves them in `/openapi.json`, the web page
reads them, and `/metrics` is derived from them. Version 1 only ever gains fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Health = Literal["healthy", "starting", "unhealthy"]
Coverage = Literal["uncovered", "single", "replicated"]


class EvidenceState(BaseModel):
    """A fraud proof a reporter uploaded (POST /api/v1/evidence) and what this monitor's re-check found."""

    sha256: str = Field(description="sha256 (hex) of the file: GET /api/v1/evidence/{sha256} serves it")
    node_peer_id: str = Field(description="the node it accuses (whose key signed the replies in it)")
    reporter_peer_id: str = Field(description="the client that wrote it")
    model: str
    start: int
    end: int
    received: float = Field(description="unix time of the upload")
    status: str = Field(
        description="proven: `torchnode check-evidence` found a wrong output the node signed; not proven: every "
        "signed output is right; invalid: not a proof; unchecked: this monitor holds no weights for it; "
        "pending: waiting for its re-check"
    )
    message: str = Field("", description="check-evidence's verdict line, or why it was not checked")


class NodeState(BaseModel):
    """One node, as its signed DHT record announces it and as it answered the monitor's signed `Info`."""

    peer_id: str = Field(description="hash of the node's Ed25519 public key (32 hex chars)")
    short_id: str = Field(description="first 12 chars of peer_id, for display")
    public_key: str = Field(description="the node's Ed25519 public key from its record, hex")
    address: str = Field(description="host:port of the node's gRPC server, from its record")
    relay: str = Field(
        "",
        description="peer id of the relay `address` belongs to (the node is behind a NAT and reached through "
        "it); empty: dialled directly",
    )
    model: str
    revision: str = Field(description="fingerprint of the checkpoint the node serves")
    start: int = Field(description="first block served")
    end: int = Field(description="one past the last block served")
    state: Literal["joining", "online", "draining"] = Field(description="the state the node announces")
    health: Health = Field(
        description="healthy: answered a signed Info consistent with its record; starting: announced "
        "'joining' and not listening yet; unhealthy: unreachable, too slow, signed by a key other than "
        "its record's, or its Info contradicts its record (see `problem`)"
    )
    problem: str | None = Field(None, description="why the node is not healthy")
    throughput: float = Field(
        description="tokens/s the node claims: from Info when healthy, else as announced (nobody checks a claim: "
        "see measured_throughput)"
    )
    measured_throughput: float | None = Field(
        None,
        description="tokens/s over the node's span as the monitor measured it: a signed one-token Forward pass "
        "each scan, less the Info round trip, averaged over scans; null until measured (or with --no-speed-probe)",
    )
    overclaims: bool = Field(
        False,
        description="the node claims far more than it serves: the monitor's pass took more than 4x what its "
        "claimed throughput promises, plus 50 ms (clients route on what they measure themselves)",
    )
    rtt_ms: float | None = Field(None, description="round trip of the signed Info call; null when it failed")
    encrypted: bool | None = Field(
        None,
        description="whether the node's gRPC channel is TLS bound to its key (false: plaintext, --insecure); "
        "null until the monitor has reached it",
    )
    cache_bytes_free: int = Field(description="KV cache memory left: from Info when healthy, else as announced")
    sessions_free: int | None = Field(None, description="inference sessions the node still accepts (from Info)")
    batch_size: int | None = Field(None, description="sequences in the node's latest batch, 0 when idle (from Info)")
    queue_length: int | None = Field(None, description="steps waiting for the node's next batch (from Info)")
    dtype: str | None = Field(None, description="compute dtype (from Info)")
    version: str = Field(description="torchnode version the node runs")
    protocol: str = Field("1.0", description="protocol version MAJOR.MINOR the node announces")
    outdated: bool = Field(
        False,
        description="the node speaks an older protocol major than this monitor: clients of this release skip it "
        "(and it counts for no block's coverage) until it upgrades",
    )
    newer: bool = Field(
        False, description="the node speaks a newer protocol major than this monitor: upgrade torchnode to use it"
    )
    total_blocks: int = Field(description="the model's block count as the node says it (0: unknown)")
    first_seen: float = Field(description="unix time the monitor first saw this peer (since it last vanished)")
    uptime_s: float = Field(description="seconds since first_seen")
    expires_in_s: float = Field(description="seconds until the node's record expires unless refreshed")
    reports: int = Field(
        0,
        description="signed fraud reports in the DHT that name this node (one per reporter key): claims, not "
        "proof; the evidence file with one of `report_evidence` proves it (torchnode check-evidence FILE MODEL)",
    )
    report_evidence: list[str] = Field([], description="sha256 (hex) of the evidence file each report names")
    proven_reports: int = Field(
        0, description="evidence files about this node that this monitor re-checked and found proven (not claims)"
    )
    dishonest: bool = Field(False, description="a proven fraud proof names this node; claims alone never set it")
    evidence: list[EvidenceState] = Field([], description="fraud proofs uploaded about this node, with their status")
    public_name: str = Field("", description="the volunteer's display name (join --public-name), signed in the record")
    contact: str = Field("", description="the volunteer's URL or e-mail address (join --contact)")
    served_tokens: int = Field(0, description="tokens the node says its blocks computed since it started (a claim)")
    served_sessions: int = Field(0, description="sessions the node says it opened since it started (a claim)")
    node_uptime_s: float = Field(0.0, description="seconds the node says it has been up")


class BlockState(BaseModel):
    block: int
    servers: int = Field(description="healthy online nodes that serve this block")
    coverage: Coverage = Field(description="uncovered: 0 servers, single: 1, replicated: 2 or more")
    throughput: float = Field(description="sum of the tokens/s of those servers")


class ModelState(BaseModel):
    name: str
    family: str | None = Field(None, description="transformers model_type, from the model index (null: not indexed)")
    revisions: list[str] = Field([], description="checkpoint revisions nodes announce in the model index")
    adapters: list[str] = Field([], description="adapters any node announces for this model in the index")
    indexed_nodes: int = Field(0, description="nodes with an entry for this model in the DHT model index")
    total_blocks: int = Field(description="the model's block count (0 while nobody has said it)")
    total_blocks_known: bool = Field(
        description="false when no node said the count: total_blocks is then only the highest block seen"
    )
    ready: bool = Field(description="healthy online nodes of one revision cover every block: a client can generate")
    ready_revision: str | None = Field(None, description="the revision whose nodes cover every block")
    missing: list[int] = Field(description="blocks no healthy online node serves")
    missing_ranges: str = Field(description="`missing` as START:END ranges (END exclusive), e.g. '3:5, 9:10'")
    bottleneck_throughput: float = Field(
        description="tokens/s of the weakest block (sum over its servers): an upper bound for one chain"
    )
    blocks: list[BlockState]
    nodes: list[NodeState] = Field(description="every node with a live record, healthy or not, by span")


class SwarmState(BaseModel):
    """GET /api/v1/state."""

    schema_version: Literal[1] = 1
    generated_at: float = Field(description="unix time this state was computed (0 before the first scan)")
    refresh_s: float = Field(description="seconds between scans")
    scan_duration_s: float = Field(description="how long the last scan (DHT lookups and probes) took")
    monitor_version: str
    dht_maddrs: list[str] = Field(description="multiaddrs of the monitor's DHT peer (empty in client mode)")
    error: str | None = Field(None, description="why the last scan failed; the state is then the previous one")
    models: list[ModelState]


class HistorySample(BaseModel):
    """One scan of one model, for the dashboard's charts."""

    t: float = Field(description="unix time of the scan")
    nodes: int = Field(description="nodes with a live record")
    nodes_online: int = Field(description="healthy online nodes")
    blocks_covered: int
    total_blocks: int
    tokens_per_s: float = Field(description="tokens/s of the weakest block: what the swarm can generate in aggregate")
    ready: bool
    sessions_free: int | None = Field(None, description="free session slots over healthy online nodes")
    batch_size: int | None = Field(None, description="sum of current batch sizes, where nodes report them")
    queue_length: int | None = Field(None, description="sum of queue lengths, where nodes report them")


class ModelHistory(BaseModel):
    """GET /api/v1/history?model=NAME."""

    model: str
    window_s: float = Field(description="seconds of history the monitor keeps")
    samples: list[HistorySample]


class NodeSample(BaseModel):
    t: float
    throughput: float
    rtt_ms: float | None
    health: Health
    state: Literal["joining", "online", "draining"]


class NodeDetail(BaseModel):
    """GET /api/v1/nodes/{peer_id}: the node now and over the last hour."""

    node: NodeState
    window_s: float
    samples: list[NodeSample]
