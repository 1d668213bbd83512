"""What the swarm looked like over the last hour, kept by the health monitor, one sample per scan.

Per model: nodes online, blocks covered, tokens/s (the weakest block's summed throughput: every token
passes every block, so that is what the swarm can generate in aggregate) and load where nodes report it
(free session slots; batch size and queue length from nodes that say them). Per node: throughput and
RTT. Samples older than `window` seconds are dropped; a scan every second over an hour keeps at most
3,600 small samples per model and node, and nodes that left are forgotten once their samples age out.
"""

from __future__ import annotations

import time
from collections import deque

from .state_schema import HistorySample, ModelState, NodeSample

DEFAULT_WINDOW = 3600.0  # seconds of history kept
LOAD_FIELDS = ("batch_size", "queue_length")  # NodeState fields summed over nodes when nodes report them


class History:
    def __init__(self, window: float = DEFAULT_WINDOW):
        if window <= 0:
            raise ValueError("the history window must be positive")
        self.window = window
        self.models: dict[str, deque[HistorySample]] = {}
        self.nodes: dict[str, deque[NodeSample]] = {}

    def record(self, models: list[ModelState], now: float | None = None) -> None:
        """Adds one sample per model and per node of a completed scan, and drops what is too old."""
        now = time.time() if now is None else now
        for m in models:
            self.models.setdefault(m.name, deque()).append(model_sample(m, now))
            for n in m.nodes:
                self.nodes.setdefault(n.peer_id, deque()).append(
                    NodeSample(t=now, throughput=n.throughput, rtt_ms=n.rtt_ms, health=n.health, state=n.state)
                )
        for series in (self.models, self.nodes):
            for key in list(series):
                samples = series[key]
                while samples and samples[0].t < now - self.window:
                    samples.popleft()
                if not samples:
                    del series[key]

    def model(self, name: str) -> list[HistorySample]:
        return list(self.models.get(name, ()))

    def node(self, peer_id: str) -> list[NodeSample]:
        return list(self.nodes.get(peer_id, ()))

    def recent_models(self) -> list[str]:
        """Models with samples in the window: a model whose nodes all left stays visible (as not ready)."""
        return list(self.models)


def model_sample(m: ModelState, now: float) -> HistorySample:
    serving = [n for n in m.nodes if n.health == "healthy" and n.state == "online"]
    load = {
        name: sum(values) if (values := [v for n in serving if (v := getattr(n, name, None)) is not None]) else None
        for name in LOAD_FIELDS
    }
    sessions = [n.sessions_free for n in serving if n.sessions_free is not None]
    return HistorySample(
        t=now,
        nodes=len(m.nodes),
        nodes_online=len(serving),
        blocks_covered=sum(b.servers > 0 for b in m.blocks),
        total_blocks=m.total_blocks,
        tokens_per_s=m.bottleneck_throughput,
        ready=m.ready,
        sessions_free=sum(sessions) if sessions else None,
        **load,
    )
