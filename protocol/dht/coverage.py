"""Which blocks a set of spans covers, and how strongly: shared by the node (choosing its span), the
client (naming what no node serves) and the health monitor (the swarm's coverage bar)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Coverage:
    throughput: list[float]  # per block: summed tokens/s of the nodes serving it
    servers: list[int]  # per block: how many nodes serve it

    @property
    def missing(self) -> list[int]:
        return [b for b, n in enumerate(self.servers) if n == 0]


def coverage(spans: Sequence[tuple[int, int, float]], total: int) -> Coverage:
    """spans: (start, end, throughput) of every serving node -> per-block coverage of blocks [0, total)."""
    throughput, servers = [0.0] * total, [0] * total
    for start, end, tps in spans:
        for b in range(max(start, 0), min(end, total)):
            throughput[b] += tps
            servers[b] += 1
    return Coverage(throughput, servers)


def block_ranges(blocks: list[int]) -> str:
    """[2, 3, 7] -> "2:4, 7:8": sorted block indices as END-exclusive ranges, for messages."""
    out, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            out.append(f"{start}:{b + 1}")
            start = None
    return ", ".join(out)
