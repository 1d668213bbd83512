"""An inference session over a chain of hops: one Inference stream per node, KV caches on the nodes.

The session keeps, for each hop, the inputs it sent (the hop's history). When a hop fails (connection
lost, timeout, error status, bad signature) the node is banned, a new chain is found for that hop's
blocks only, and the history is replayed through it to rebuild the KV caches there; then the step
goes on. The caller sees the same tokens as an undisturbed run, and a log line. Retries are bounded in
count and time (tenacity, exponential backoff with jitter); the last error names the blocks no live
node serves.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, stop_after_delay
from tenacity import wait_exponential_jitter

from ..protocol.node_client import NodeClient, NodeError, NodeSession, SessionSpec
from .routing import NoRouteError

log = logging.getLogger(__name__)

DEFAULT_STEP_TIMEOUT = 30.0


@dataclass
class Hop:
    node: NodeClient
    start: int
    end: int
    stream: NodeSession | None = None
    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (position, inputs) sent so far


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6  # routes tried for one failed hop
    max_seconds: float = 60.0  # time spent recovering one failed hop
    backoff_initial: float = 0.1
    backoff_max: float = 5.0


Router = Callable[[int, int], Awaitable[list[Hop]]]  # (start, end) -> fresh hops covering [start, end)


class InferenceSession:
    def __init__(
        self,
        hops: list[Hop],
        max_length: int,
        batch_size: int = 1,
        wire_dtype: torch.dtype = torch.float32,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
        router: Router | None = None,
        on_failure: Callable[[NodeClient], None] = lambda node: None,
        retry: RetryPolicy = RetryPolicy(),
    ):
        self.hops, self.max_length, self.batch_size = hops, max_length, batch_size
        self.wire_dtype, self.step_timeout = wire_dtype, step_timeout
        self.router, self.on_failure, self.retry = router, on_failure, retry
        self.id = uuid.uuid4().hex
        self.position = 0  # tokens processed so far

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Sends hidden states (B, T, H) of tokens at `position` (default: next) through every hop."""
        position = self.position if position is None else position
        tokens = hidden.shape[1]
        if position + tokens > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded at position {position}")
        rewind = position < self.position
        i = 0
        while i < len(self.hops):
            hop = self.hops[i]
            if rewind:  # forget the future, cutting an entry that straddles `position` (a replay is one entry)
                hop.history = [(p, h[:, : position - p]) for p, h in hop.history if p < position]
            hop.history.append((position, hidden))
            try:
                hidden = await self._send(hop, hidden, position)
                i += 1
            except NodeError as error:
                replacement, out = await self._recover(hop, error)
                self.hops[i : i + 1] = replacement
                i += len(replacement)
                hidden = out[:, -tokens:]
        self.position = position + tokens
        return hidden

    async def _send(self, hop: Hop, hidden: torch.Tensor, position: int) -> torch.Tensor:
        if hop.stream is None:
            spec = SessionSpec(self.id, hop.start, hop.end, self.max_length, self.batch_size, self.wire_dtype)
            hop.stream = hop.node.open_session(spec)
        return await hop.stream.step(hidden, position, self.step_timeout)

    async def _recover(self, failed: Hop, error: NodeError) -> tuple[list[Hop], torch.Tensor]:
        """New hops for the failed hop's blocks, with its history replayed; returns them and their output."""
        log.warning("node %s failed on blocks %d:%d (%s); re-routing", failed.node.address, failed.start, failed.end, error)
        self.on_failure(failed.node)
        self._abandon(failed)
        if self.router is None:
            raise error
        inputs = torch.cat([h for _, h in failed.history], dim=1)  # positions 0.. in order
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.max_attempts) | stop_after_delay(self.retry.max_seconds),
            wait=wait_exponential_jitter(multiplier=self.retry.backoff_initial, max=self.retry.backoff_max),
            retry=retry_if_exception_type((NodeError, NoRouteError)),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                hops = await self.router(failed.start, failed.end)
                out = await self._replay(hops, inputs)
                log.warning("blocks %d:%d recovered on %s", failed.start, failed.end, ", ".join(h.node.address for h in hops))
                return hops, out
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _replay(self, hops: list[Hop], inputs: torch.Tensor) -> torch.Tensor:
        for hop in hops:
            hop.history = [(0, inputs)]
            try:
                inputs = await self._send(hop, inputs, 0)
            except NodeError:
                self.on_failure(hop.node)
                for h in hops:
                    self._abandon(h)
                raise
        return inputs

    def _abandon(self, hop: Hop) -> None:
        if hop.stream is not None:
            hop.stream.abort()
            hop.stream = None

    async def close(self) -> None:
        for hop in self.hops:
            if hop.stream is not None:
                await hop.stream.close()
                hop.stream = None
