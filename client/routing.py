"""Choosing a chain of nodes that covers blocks [0, total): shortest path over span boundaries.

Graph: vertices are block boundaries 0..total; a node serving [s, e) offers an edge from every boundary
b in [s, e) to min(e, total): it may run any part of its span (starting late, or ending early when only
a sub-range is routed, e.g. to replace a failed hop). Edge cost = the node's RTT plus the time its blocks
take at its announced throughput; Dijkstra finds the cheapest chain. Each node's cost is scaled by a
random factor in [1, 1.1) per route, so replicas that are about equally good share the clients' load
instead of all of them picking the same node.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..protocol.dht.coverage import block_ranges

PER_HOP_OVERHEAD_S = 0.001  # serialization + signing per hop, measured on loopback
SPREAD = 0.1  # costs within ~10% count as equal: each route call draws a factor in [1, 1 + SPREAD) per node
UNKNOWN_THROUGHPUT = 1.0  # tokens/s assumed for a node that announced none
RELAY_LEG_S = 0.005  # a relayed node's extra leg: the relay's splice, and a relay shared with other nodes


class NoRouteError(RuntimeError):
    """No chain of live nodes covers every block; `missing` names the uncovered blocks."""

    def __init__(self, missing: list[int], total: int):
        self.missing, self.total = missing, total
        ranges = block_ranges(missing)
        super().__init__(f"no live node serves blocks {ranges} of the model's {total} blocks")


@dataclass(frozen=True)
class Candidate:
    key: str  # anything that identifies the node to the caller (address, peer id)
    start: int
    end: int
    throughput: float = 0.0  # tokens/s over its whole span
    rtt: float = 0.0  # seconds
    relayed: bool = False  # reached through a relay (the node is behind a NAT): one more leg per step
    adapters: tuple[str, ...] = ()  # LoRA adapters it serves (its Info); routing ignores them, listings use them


@dataclass(frozen=True)
class RouteHop:
    key: str
    start: int
    end: int


def edge_cost(c: Candidate, start: int, stop: int) -> float:
    """Seconds to run blocks [start, stop) on `c`: RTT + per-hop overhead + its share of the span's time."""
    throughput = c.throughput if c.throughput > 0 else UNKNOWN_THROUGHPUT
    per_block = 1.0 / (throughput * (c.end - c.start))
    relay = RELAY_LEG_S if c.relayed else 0.0  # the probe's RTT has the leg's distance; this, its sharing
    return c.rtt + PER_HOP_OVERHEAD_S + relay + per_block * (stop - start)


def find_route(
    candidates: Sequence[Candidate], total: int, start: int = 0, rng: random.Random | None = None
) -> list[RouteHop]:
    """The cheapest chain of (node, start, end) covering [start, total); raises NoRouteError."""
    rng = rng or random.Random()
    # Measured RTTs never tie exactly, so plain Dijkstra would send every client to the same replica;
    # a small random factor per node and route spreads clients over replicas that are about as good.
    factor = {id(c): 1.0 + SPREAD * rng.random() for c in candidates}
    missing = [b for b in range(start, total) if not any(c.start <= b < c.end for c in candidates)]
    if missing:
        raise NoRouteError(missing, total)
    best: dict[int, float] = {start: 0.0}
    parent: dict[int, tuple[int, Candidate]] = {}
    heap = [(0.0, 0, start)]
    while heap:
        cost, _, b = heapq.heappop(heap)
        if b == total:
            break
        if cost > best.get(b, float("inf")):
            continue
        for c in candidates:
            if c.start <= b < c.end:
                stop = min(c.end, total)  # a hop runs any part of its span: it may start late or end early
                new = cost + edge_cost(c, b, stop) * factor[id(c)]
                if new < best.get(stop, float("inf")) - 1e-12:
                    best[stop], parent[stop] = new, (b, c)
                    heapq.heappush(heap, (new, stop, stop))
    route, b = [], total
    while b != start:
        prev, c = parent[b]
        route.append(RouteHop(c.key, prev, b))
        b = prev
    return route[::-1]
