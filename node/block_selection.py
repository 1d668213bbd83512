"""Where a joining node should serve, and whether a serving node should move (Petals' idea, our rules).

Coverage of a block = the summed throughput (tokens/s) of the nodes serving it. A joining node takes the
window of `num_blocks` whose sorted coverage vector is smallest (it lifts the weakest blocks first);
ties go to the window with fewest servers, then the lowest start. A serving node moves when taking
the best window instead of its own would raise the swarm's weakest-block coverage by more than a
threshold: moving costs a reload, so small gains are not worth it.
"""

from __future__ import annotations

from ..protocol.dht.coverage import Coverage


def choose_start(cov: Coverage, num_blocks: int) -> int:
    """Start of the weakest window of `num_blocks` blocks."""
    total = len(cov.throughput)
    num_blocks = min(num_blocks, total)

    def weakness(start: int):
        window = slice(start, start + num_blocks)
        return sorted(cov.throughput[window]), sum(cov.servers[window]), start

    return min(range(total - num_blocks + 1), key=weakness)


def weakest_with(cov: Coverage, start: int, num_blocks: int, throughput: float) -> float:
    """The swarm's weakest-block coverage if a node of `throughput` served [start, start+num_blocks)."""
    return min(t + (throughput if start <= b < start + num_blocks else 0.0) for b, t in enumerate(cov.throughput))


def better_start(others: Coverage, current: int, num_blocks: int, throughput: float, threshold: float) -> int | None:
    """The start to move to, or None to stay. `others` excludes this node's own span."""
    best = choose_start(others, num_blocks)
    if best == current:
        return None
    now = weakest_with(others, current, num_blocks, throughput)
    after = weakest_with(others, best, num_blocks, throughput)
    if now <= 0.0:
        return best if after > 0.0 else None  # covering a gap always pays; shuffling among gaps never does
    return best if after > now * (1.0 + threshold) else None
