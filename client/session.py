"""An inference session over a chain of hops: one Inference stream per node, KV caches on the nodes.

The session keeps, for each hop, the inputs it sent (the hop's history). When a hop fails (connection
lost, timeout, error status, bad signature) the node is banned, a new chain is found for that hop's
blocks only, and the history is replayed through it to rebuild the KV caches there; then the step
goes on. The caller sees the same tokens as an undisturbed run, and a log line. Retries are bounded in
count and time (tenacity, exponential backoff with jitter); the last error names the blocks no live
node serves.
"""

from __future__ import annotations

import asyncio
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
DEFAULT_PREFILL_CHUNK = 128  # tokens per chunk of a pipelined prefill of a longer input; 0 = one step


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
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        adapter: str | None = None,
    ):
        self.hops, self.max_length, self.batch_size = hops, max_length, batch_size
        self.prefill_chunk = prefill_chunk
        self.adapter = adapter or ""  # the LoRA adapter every hop applies (its router finds only nodes serving it)
        self.wire_dtype, self.step_timeout = wire_dtype, step_timeout
        self.router, self.on_failure, self.retry = router, on_failure, retry
        self.id = uuid.uuid4().hex
        self.position = 0  # tokens processed so far
        self.verifier = None  # a client.verification.Verifier when the client verifies nodes (--verify)

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
            if rewind:
                _forget_from(hop, position)
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

    async def prefill(self, hidden: torch.Tensor, chunk: int | None = None, position: int | None = None) -> torch.Tensor:
        """Like `step`, but a long input (B, T, H) flows through the chain in chunks of `chunk` tokens (default:
        the session's `prefill_chunk`), as a pipeline: the first hop works on chunk 2 while the second works
        on chunk 1. Each chunk is an ordinary step of each hop (kept in its history). If a hop fails midway,
        the whole input is sent again with `step`, which rewinds every hop to `position` and fails over.
        """
        chunk = self.prefill_chunk if chunk is None else chunk
        position = self.position if position is None else position
        tokens = hidden.shape[1]
        if chunk <= 0 or tokens <= chunk or len(self.hops) < 2:
            return await self.step(hidden, position)
        if position + tokens > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded at position {position}")
        if position < self.position:
            for hop in self.hops:
                _forget_from(hop, position)
        try:
            out = await self._pipeline(list(hidden.split(chunk, dim=1)), position)
        except NodeError as error:
            log.warning("pipelined prefill stopped (%s); sending the input again hop by hop", error)
            self.position = max(self.position, position + tokens)  # so that step() rewinds every hop to `position`
            return await self.step(hidden, position)
        self.position = position + tokens
        return out

    async def _pipeline(self, chunks: list[torch.Tensor], position: int) -> torch.Tensor:
        """One task per hop, each taking its input chunks from a queue in order and passing its outputs on.

        A stage that fails stops the stages before it from taking new chunks; every step already sent is
        awaited (never cancelled), so each node's stream stays in lock step for the fallback.
        """
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(len(self.hops) + 1)]
        for i, x in enumerate(chunks):
            queues[0].put_nowait((position + sum(c.shape[1] for c in chunks[:i]), x))
        queues[0].put_nowait(None)
        failed = asyncio.Event()

        async def stage(hop: Hop, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
            try:
                while not failed.is_set() and (item := await inbox.get()) is not None:
                    at, x = item
                    hop.history.append((at, x))
                    outbox.put_nowait((at, await self._send(hop, x, at)))
            except BaseException:
                failed.set()
                raise
            finally:
                outbox.put_nowait(None)

        hops = list(self.hops)
        results = await asyncio.gather(
            *(stage(hop, queues[i], queues[i + 1]) for i, hop in enumerate(hops)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        outputs = []
        while (item := queues[-1].get_nowait()) is not None:
            outputs.append(item[1])
        return torch.cat(outputs, dim=1)  # (B, T, H)

    async def _send(self, hop: Hop, hidden: torch.Tensor, position: int) -> torch.Tensor:
        if hop.stream is None:
            spec = SessionSpec(self.id, hop.start, hop.end, self.max_length, self.batch_size, self.wire_dtype, self.adapter)
            hop.stream = hop.node.open_session(spec)
        out = await hop.stream.step(hidden, position, self.step_timeout)
        if self.verifier is not None:  # client/verification.py: checks every output before it is used
            self.verifier.observe(hop, position, out)
        return out

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

    async def replace(self, hop: Hop, keep: int) -> None:
        """Swaps `hop` (its node was caught lying) for a fresh route over its blocks, replaying its inputs
        before position `keep`; the caller then steps again from `keep`."""
        _forget_from(hop, keep)
        if keep > 0:
            replacement, _ = await self._recover(hop, NodeError(hop.node.address, "returned wrong outputs"))
        else:  # nothing to replay: the next step opens the new route
            self.on_failure(hop.node)
            self._abandon(hop)
            replacement = await self.router(hop.start, hop.end)
        i = next(i for i, h in enumerate(self.hops) if h is hop)
        self.hops[i : i + 1] = replacement

    async def close(self) -> None:
        if self.verifier is not None:
            await self.verifier.close()
        for hop in self.hops:
            if hop.stream is not None:
                await hop.stream.close()
                hop.stream = None


def _forget_from(hop: Hop, position: int) -> None:
    """Forgets the hop's inputs from `position` on, cutting an entry that straddles it (a replay is one entry)."""
    hop.history = [(p, h[:, : position - p]) for p, h in hop.history if p < position]
