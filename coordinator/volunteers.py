"""Credit for volunteers: what each node served, kept by the health monitor over time, per node and per name.

Nodes announce, in their signed records, a display name (`join --public-name`), a contact, and counters since
they started: tokens through their blocks, sessions opened, uptime (protocol/dht/credit.py). Those are claims.
The ledger credits only what it can bound:
- only growth it watched: a counter's increase between two scans of the node while it was online and healthy
  (answered a signed Info with its record's key); what a node claims for before the monitor first saw it is
  not credited, and a counter that goes down (the node restarted, or moved its span) starts a new baseline;
- at most `cap_factor` x the node's tokens/s x the seconds between the two scans: a node may batch many
  sessions and prefill long prompts far faster than it decodes one token, hence a generous factor, but a
  node cannot claim a billion tokens in an hour. The tokens/s is the monitor's own measurement (a signed
  one-token pass through the node each scan, `measured_throughput`), or, without one, the node's signed Info;
  what the cap refused is kept (`capped_tokens`), so an outlier is visible;
- uptime is the monitor's own: seconds between consecutive healthy online scans, each gap counted up to
  `max_gap_s`, so a monitor that was down credits nobody for the time it did not watch.
Counts per minute are kept for a day, for the last hour / day totals and the chart. With a `path`, the ledger
is saved there (JSON, written atomically) after each scan and read back at start, so a restart keeps them.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from .state_schema import NodeState

log = logging.getLogger(__name__)

DEFAULT_CAP_FACTOR = 64.0  # credited tokens per scan <= this x tokens/s x seconds since the last scan
MIN_CAP_TPS = 1.0  # tokens/s a node is allowed at least (a node that has not measured itself yet)
BUCKET_S = 60  # seconds per bucket of the served-tokens series
KEEP_S = 24 * 3600  # buckets kept: a day
MAX_GAP_S = 60.0  # at most this much uptime is credited for one gap between scans
ANONYMOUS = ""  # the name of nodes that announce none: each is its own row, by peer id
FILE_VERSION = 1


@dataclass
class NodeTally:
    """One node's credited totals, and what it claimed at the last scan."""

    peer_id: str
    model: str = ""
    name: str = ""
    contact: str = ""
    claimed_tokens: int = 0  # the counter at the last scan (the baseline of the next increase)
    claimed_sessions: int = 0
    last_seen: float | None = None  # unix time of the last healthy online scan (None: never)
    tokens: int = 0  # credited
    sessions: int = 0
    uptime_s: float = 0.0  # the monitor's own: healthy online time it watched
    capped_tokens: int = 0  # claimed growth the cap refused
    # the latest scan's view, not persisted as totals
    online: bool = False
    blocks: int = 0
    throughput: float = 0.0
    address: str = ""


class VolunteerNode(BaseModel):
    peer_id: str
    short_id: str
    model: str
    address: str
    online: bool = Field(description="healthy and online in the latest scan")
    blocks: int = Field(description="blocks it serves (latest scan)")
    throughput: float = Field(description="tokens/s the monitor measured (else its signed Info), latest scan")
    tokens: int = Field(description="tokens credited (see /api/v1/volunteers `method`)")
    tokens_hour: int
    tokens_day: int
    sessions: int
    uptime_s: float = Field(description="healthy online time the monitor watched")
    capped_tokens: int = Field(description="claimed tokens the cap refused")


class Volunteer(BaseModel):
    name: str = Field(description="the nodes' --public-name; empty: an anonymous node (one row per node)")
    contact: str = Field("", description="--contact of its latest node that gave one")
    nodes_online: int
    nodes: list[VolunteerNode]
    blocks: int = Field(description="blocks its online nodes serve")
    throughput: float = Field(description="sum of its online nodes' tokens/s")
    tokens: int
    tokens_hour: int
    tokens_day: int
    sessions: int
    uptime_s: float


class VolunteersState(BaseModel):
    generated_at: float
    method: str = Field(description="how claims are turned into credit")
    cap_factor: float
    bucket_s: int = Field(description="seconds per point of `series`")
    series: list[list[float]] = Field(description="[unix time of the bucket's start, tokens credited in it], a day")
    tokens: int = Field(description="all tokens credited")
    volunteers: list[Volunteer]


METHOD = (
    "growth of each node's signed counters between two scans in which it was online and healthy, at most "
    "cap_factor x its tokens/s (measured by the monitor, else its signed Info) x the seconds between them; "
    "uptime is the monitor's own"
)


@dataclass
class VolunteerLedger:
    path: Path | None = None  # where the ledger persists (None: memory only)
    cap_factor: float = DEFAULT_CAP_FACTOR
    max_gap_s: float = MAX_GAP_S
    nodes: dict[str, NodeTally] = field(default_factory=dict)
    buckets: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))  # start -> {peer: tokens}

    def __post_init__(self):
        if not self.cap_factor > 0 or not self.max_gap_s > 0:
            raise ValueError("the credit cap factor and the largest gap must be positive")
        if self.path is not None and self.path.exists():
            self._load()

    def record(self, nodes: Iterable[NodeState], now: float) -> None:
        """Credits one scan's nodes (see the module's docstring); saves the ledger when it has a path."""
        seen = set()
        for node in nodes:
            seen.add(node.peer_id)
            self._credit(node, now)
        for peer in self.nodes.keys() - seen:
            self.nodes[peer].online = False
        for start in [s for s in self.buckets if s < now - KEEP_S]:
            del self.buckets[start]
        if self.path is not None:
            self._save()

    def _credit(self, node: NodeState, now: float) -> None:
        tally = self.nodes.setdefault(node.peer_id, NodeTally(node.peer_id))
        tally.model, tally.address, tally.blocks = node.model, node.address, node.end - node.start
        tally.name, tally.contact = node.public_name, node.contact
        tally.online = node.health == "healthy" and node.state == "online"
        speed = node.measured_throughput if node.measured_throughput is not None else node.throughput
        tally.throughput = speed if tally.online else 0.0
        if not tally.online:
            return
        if tally.last_seen is not None:  # growth since the last healthy scan; none credited on the first sight
            elapsed = max(0.0, now - tally.last_seen)
            grown = _growth(node.served_tokens, tally.claimed_tokens)
            cap = int(self.cap_factor * max(speed, MIN_CAP_TPS) * elapsed)
            credited = min(grown, cap)
            tally.tokens += credited
            tally.capped_tokens += grown - credited
            tally.sessions += min(_growth(node.served_sessions, tally.claimed_sessions), int(cap))
            tally.uptime_s += min(elapsed, self.max_gap_s)
            if credited:
                bucket = self.buckets[int(now // BUCKET_S * BUCKET_S)]
                bucket[node.peer_id] = bucket.get(node.peer_id, 0) + credited
        tally.claimed_tokens, tally.claimed_sessions, tally.last_seen = node.served_tokens, node.served_sessions, now

    def state(self, now: float) -> VolunteersState:
        """Per-name totals (anonymous nodes one row each), the swarm's served tokens per minute over a day."""
        hour, day = self._window(now, 3600), self._window(now, KEEP_S)
        rows: dict[str, list[VolunteerNode]] = defaultdict(list)
        contact: dict[str, str] = {}
        for t in sorted(self.nodes.values(), key=lambda t: t.peer_id):
            node = VolunteerNode(
                peer_id=t.peer_id,
                short_id=t.peer_id[:12],
                model=t.model,
                address=t.address,
                online=t.online,
                blocks=t.blocks if t.online else 0,
                throughput=t.throughput,
                tokens=t.tokens,
                tokens_hour=hour.get(t.peer_id, 0),
                tokens_day=day.get(t.peer_id, 0),
                sessions=t.sessions,
                uptime_s=round(t.uptime_s, 1),
                capped_tokens=t.capped_tokens,
            )
            key = t.name or ANONYMOUS + "\0" + t.peer_id
            rows[key].append(node)
            if t.contact and (t.online or key not in contact):
                contact[key] = t.contact
        volunteers = [
            Volunteer(
                name=key.split("\0")[0],
                contact=contact.get(key, ""),
                nodes_online=sum(n.online for n in nodes),
                nodes=nodes,
                blocks=sum(n.blocks for n in nodes),
                throughput=round(sum(n.throughput for n in nodes), 2),
                tokens=sum(n.tokens for n in nodes),
                tokens_hour=sum(n.tokens_hour for n in nodes),
                tokens_day=sum(n.tokens_day for n in nodes),
                sessions=sum(n.sessions for n in nodes),
                uptime_s=round(sum(n.uptime_s for n in nodes), 1),
            )
            for key, nodes in rows.items()
        ]
        volunteers.sort(key=lambda v: (-v.tokens, v.name, v.nodes[0].peer_id))
        series = [[float(s), float(sum(b.values()))] for s, b in sorted(self.buckets.items()) if s >= now - KEEP_S]
        return VolunteersState(
            generated_at=now,
            method=METHOD,
            cap_factor=self.cap_factor,
            bucket_s=BUCKET_S,
            series=series,
            tokens=sum(t.tokens for t in self.nodes.values()),
            volunteers=volunteers,
        )

    def _window(self, now: float, seconds: float) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for start, bucket in self.buckets.items():
            if start >= now - seconds:
                for peer, tokens in bucket.items():
                    out[peer] += tokens
        return out

    # ---- persistence
    def _save(self) -> None:
        data = {
            "version": FILE_VERSION,
            "nodes": [asdict(t) for t in self.nodes.values()],
            "buckets": {str(s): b for s, b in self.buckets.items()},
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)
        except OSError as e:  # credit is best effort: the dashboard goes on
            log.warning("could not save the volunteers ledger to %s: %s", self.path, e)

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != FILE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {FILE_VERSION}")
            known = set(NodeTally.__dataclass_fields__)
            for raw in data["nodes"]:
                tally = NodeTally(**{k: v for k, v in raw.items() if k in known})
                tally.online = False
                self.nodes[tally.peer_id] = tally
            for start, bucket in data["buckets"].items():
                self.buckets[int(start)] = {str(p): int(n) for p, n in bucket.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read the volunteers ledger {self.path}: {e}") from None


def _growth(claimed: int, baseline: int) -> int:
    """How much a counter grew since `baseline`; a counter that went down restarted (from 0)."""
    return claimed - baseline if claimed >= baseline else claimed
