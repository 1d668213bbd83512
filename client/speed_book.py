"""What this client measured of each node's speed, and the speed routing should believe.

A node's announced throughput is a claim, and nobody checks a claim: a node announcing 100x its speed
would take every client's traffic. So the client times every hop of every step it sends (client/session.py)
and keeps, per node, a moving average of the seconds one block of one step took there (the hop's time less
the round trip its probe measured). Routing (client/routing.py) weighs `believed(candidate)`:

- a measured node: the measurement, blended with the claim only until `trust_steps` steps were timed;
- a node with no history gets a fair trial: its claim, but never better than the median of the nodes this
  client measured to keep their own claims (not zero, not its claim), so fresh records announcing great
  speed cannot outrank nodes that proved theirs; a node caught far slower than it claims does not set that
  bar (or one slow liar would make every untried node look as slow); with none measured, claims stand;
- a measurement older than `forget_after` seconds is dropped: the node gets a new trial (nodes change).

`far_slower` tells a session (client/session.py) to re-route around a hop mid-session: its steps measured
more than `reroute_gap` times what its claim promises (plus `reroute_slack` seconds, for honest overheads).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace

from .config import DEFAULT_SPEED_POLICY, SpeedPolicy
from .routing import UNKNOWN_THROUGHPUT, Candidate

__all__ = ["MAX_TIMED_TOKENS", "SpeedBook", "SpeedPolicy"]  # SpeedPolicy: client/config.py

MAX_TIMED_TOKENS = 8  # steps of at most this many tokens are timed (decode and drafted steps; not prefills)


@dataclass
class _Record:
    claim: float = 0.0  # seconds per block per step the node's announced throughput promises
    blocks: int = 1  # the node's span length (from its probe)
    rtt: float = float("inf")  # seconds, the shortest probe round trip (the first one includes TLS set-up)
    measured: float | None = None  # seconds per block per step, moving average of timed steps
    steps: int = 0  # timed steps so far
    at: float = field(default_factory=time.monotonic)  # time.monotonic() of the latest timed step


class SpeedBook:
    """Per node address: its claim (from probes) and what this client measured (from timed steps)."""

    def __init__(self, policy: SpeedPolicy = DEFAULT_SPEED_POLICY):
        self.policy = policy
        self._nodes: dict[str, _Record] = {}

    def _record(self, address: str) -> _Record:
        record = self._nodes.setdefault(address, _Record())
        if record.measured is not None and time.monotonic() - record.at > self.policy.forget_after:
            record.measured, record.steps = None, 0  # stale: the node gets a new trial
        return record

    def observe(self, candidate: Candidate) -> None:
        """Notes what a probe said: the node's claim and its round trip."""
        record = self._record(candidate.key)
        record.blocks = max(1, candidate.end - candidate.start)
        record.claim, record.rtt = _per_block(candidate.throughput, record.blocks), min(record.rtt, candidate.rtt)

    def rtt(self, address: str) -> float:
        """Seconds: the shortest probe round trip to `address` (0 if it was never probed)."""
        record = self._nodes.get(address)
        return 0.0 if record is None or record.rtt == float("inf") else record.rtt

    def record(self, address: str, blocks: int, seconds: float, round_trips: float = 1.0) -> None:
        """A step of `blocks` blocks took `seconds` at `address`, including `round_trips` of its probe RTT."""
        if not self.policy.measure or blocks <= 0 or seconds <= 0:
            return
        record = self._record(address)
        rtt = record.rtt if record.rtt < float("inf") else 0.0
        # a probe's RTT may include a TLS set-up (a first contact): it never takes more than half of a step
        served = max(seconds - round_trips * rtt, seconds / 2) / blocks
        w = self.policy.ema_weight
        record.measured = served if record.measured is None else (1 - w) * record.measured + w * served
        record.steps, record.at = record.steps + 1, time.monotonic()

    def measured(self, address: str) -> float | None:
        """Measured tokens/s over one block (None: not measured)."""
        record = self._nodes.get(address)
        return None if record is None or record.measured is None else 1 / record.measured

    def believed(self, candidate: Candidate) -> Candidate:
        """The candidate with the throughput routing should weigh (see the module's docstring)."""
        if not self.policy.measure:
            return candidate
        blocks = candidate.end - candidate.start
        seconds = self._per_block(candidate.key, _per_block(candidate.throughput, blocks))
        return replace(candidate, throughput=1 / (seconds * blocks))

    def measured_step(self, address: str, blocks: int) -> float | None:
        """Seconds a step of `blocks` blocks took at `address` as measured (None: not measured)."""
        record = self._record(address)
        return None if record.measured is None else record.measured * blocks

    def _per_block(self, address: str, claim: float) -> float:
        record = self._record(address)
        prior = claim
        others = [
            r.measured
            for a, r in self._nodes.items()
            if a != address and r.measured is not None and not self._breaks_claim(r, r.blocks)
        ]
        if others:  # a fair trial: no better than the median node measured (that keeps its claim)
            prior = max(prior, statistics.median(others))
        if record.measured is None:
            return prior
        trust = min(1.0, record.steps / self.policy.trust_steps)
        return trust * record.measured + (1 - trust) * prior

    def far_slower(self, address: str, blocks: int) -> bool:
        """Whether a step of `blocks` blocks at `address` takes far longer than its claim promises."""
        p = self.policy
        record = self._nodes.get(address)
        if not p.measure or record is None or record.steps < p.reroute_after:
            return False
        return self._breaks_claim(record, blocks)

    def _breaks_claim(self, record: _Record, blocks: int) -> bool:
        p = self.policy
        if record.measured is None:
            return False
        return record.measured * blocks > p.reroute_gap * record.claim * blocks + p.reroute_slack


def _per_block(throughput: float, blocks: int) -> float:
    """Seconds per block per step that `throughput` (tokens/s over a span of `blocks`) promises."""
    return 1 / ((throughput if throughput > 0 else UNKNOWN_THROUGHPUT) * max(blocks, 1))
