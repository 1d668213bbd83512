"""An inference session over a chain of hops: one Inference stream per node, KV caches on the nodes.

The session keeps, for each hop, the inputs it sent (the hop's history). When a hop fails (connection
lost, timeout, error status, bad signature) the node is banned, a new chain is found for that hop's
blocks only, and the history is replayed through it to rebuild the KV caches there; then the step
goes on. The caller sees the same tokens as an undisturbed run, and a log line. Retries are bounded in
count and time (tenacity, exponential backoff with jitter); the last error names the blocks no live
node serves.

Every hop's steps are timed into the client's speed book (client/speed_book.py): routing weighs what was
measured, not what nodes announce. A hop measured far slower than it claims is re-routed around after the
step that showed it, the same way (its history replayed on the new route), when routing finds another way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from ..protocol.wire.node_client import (
    NodeClient,
    NodeError,
    NodeSession,
    PushedStep,
    PushTarget,
    SessionSpec,
    tensor_digest,
)
from .config import (
    DEFAULT_BATCH_STEPS,
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_PUSH,
    DEFAULT_PUSH_MIN_RTT_S,
    DEFAULT_RETRY,
    DEFAULT_STEP_TIMEOUT,
    RetryPolicy,
)
from .routing import NoRouteError
from .speed_book import MAX_TIMED_TOKENS, SpeedBook

__all__ = ["Hop", "InferenceSession", "RetryPolicy", "Router", "SessionVerifier"]  # RetryPolicy: client/config.py

log = logging.getLogger(__name__)


@dataclass
class Hop:
    node: NodeClient
    start: int
    end: int
    stream: NodeSession | None = None
    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (position, inputs) sent so far
    speed_checked: bool = False  # re-routing around this hop for slowness was tried (once per hop)
    rtt: float = 0.0  # seconds: this client's shortest probe round trip to the node (0: not measured)


Router = Callable[..., Awaitable[list[Hop]]]  # (start, end[, addresses to avoid]) -> fresh hops covering [start, end)


class SessionVerifier(Protocol):
    """What a session asks of `--verify` (client/verification/verifier.py implements it): the session reports
    every hop output it uses; the caller asks for a check and gets the position to rewind to, if any."""

    def observe(self, hop: Hop, position: int, out: torch.Tensor, pushed: torch.Tensor | None = None) -> None: ...

    async def check(self, final: bool = False) -> int | None: ...

    async def close(self) -> None: ...

    @property
    def verified(self) -> int: ...  # outputs at positions below it are checked (or were never used)


class InferenceSession:
    def __init__(
        self,
        hops: list[Hop],
        max_length: int,
        batch_size: int = 1,
        wire_dtype: torch.dtype = torch.float32,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
        router: Router | None = None,
        on_failure: Callable[[NodeClient], object] = lambda node: None,
        retry: RetryPolicy = DEFAULT_RETRY,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        adapter: str = "",
        push: bool = DEFAULT_PUSH,
        speeds: SpeedBook | None = None,
        push_min_rtt: float = DEFAULT_PUSH_MIN_RTT_S,
        batch_steps: bool = DEFAULT_BATCH_STEPS,
    ):
        self.hops, self.max_length, self.batch_size = hops, max_length, batch_size
        self.speeds = speeds  # where hops' step times go; None: steps are not timed (no re-routing for speed)
        self.reroutes = 0  # hops re-routed around for being far slower than they claim
        self.push = push  # node-to-node push for steps: hops + 1 one-way legs per step instead of 2 x hops
        self.push_min_rtt = push_min_rtt  # seconds: a hop whose node is nearer gets its input from the client
        self.batch_steps = batch_steps  # steps share a message per node per round with the client's other sessions'
        self.node_pushes = 0  # hop inputs that came straight from the previous node (not from the client)
        self.prefill_chunk = prefill_chunk
        self.adapter = adapter  # the LoRA adapter every hop applies, "" none (its router finds only nodes serving it)
        self.wire_dtype, self.step_timeout = wire_dtype, step_timeout
        self.router, self.on_failure, self.retry = router, on_failure, retry
        self.id = uuid.uuid4().hex
        self.position = 0  # tokens processed so far
        self.verifier: SessionVerifier | None = None  # set by open_session when the client verifies (--verify)
        self._ahead: asyncio.Task | None = None  # the step `step_ahead` sent, until another call waits for it

    def step_ahead(self, hidden: torch.Tensor) -> asyncio.Task:
        """`step(hidden)` at the next position, started now in a task of its own: the decode loop hands its
        token to the caller while the step runs. Every later step, prefill, replacement or close of the
        session waits for it first, so the steps keep their order even if whoever started it never looks
        at it again (a caller that stopped reading); its error, if nobody awaits it, is left to the next step.
        One at a time: the previous one must be done."""
        if self._ahead is not None and not self._ahead.done():
            raise RuntimeError("a step sent ahead is still running: await it before sending another")
        task = asyncio.ensure_future(self.step(hidden, self.position))
        task.add_done_callback(_retrieved)
        self._ahead = task
        return task

    async def _settle_ahead(self) -> None:
        """Waits for the step sent ahead, unless this is it."""
        ahead = self._ahead
        if ahead is not None and ahead is not asyncio.current_task():
            self._ahead = None
            await asyncio.gather(ahead, return_exceptions=True)

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Sends hidden states (B, T, H) of tokens at `position` (default: next) through every hop."""
        await self._settle_ahead()
        position = self.position if position is None else position
        tokens = _checked_tokens(hidden)
        if position + tokens > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded at position {position}")
        rewind = position < self.position
        if self.push and any(self._pushed_into(hop) for hop in self.hops[1:]):
            out = await self._pushed(hidden, position, rewind)
        else:
            out = await self._hop_by_hop(hidden, position, rewind)
        self.position = position + tokens
        await self._leave_slow_hops()
        return out

    async def _leave_slow_hops(self) -> None:
        """Re-routes around each hop the speed book finds far slower than its claim, to a route that avoids it
        (whatever its untried nodes claim: they get a trial) unless its nodes were measured less than twice as
        fast, replaying its history there; a hop whose blocks nobody else serves faster, or whose replacement
        fails, stays."""
        if self.speeds is None or self.router is None:
            return
        for hop in list(self.hops):
            if hop.speed_checked or not self.speeds.far_slower(hop.node.address, hop.end - hop.start):
                continue
            hop.speed_checked = True
            try:
                hops = await self.router(hop.start, hop.end, {hop.node.address})
                now = self.speeds.measured_step(hop.node.address, hop.end - hop.start) or 0.0
                if sum(self.speeds.measured_step(h.node.address, h.end - h.start) or 0.0 for h in hops) > now / 2:
                    continue  # measured no faster (a loaded machine slows every node); untried nodes get a trial
                inputs = torch.cat([h for _, h in hop.history], dim=1)  # positions 0.. in order
                await self._replay(hops, inputs)
            except (NodeError, NoRouteError) as error:
                log.info("keeping slow node %s on blocks %d:%d (%s)", hop.node.address, hop.start, hop.end, error)
                continue
            log.warning(
                "node %s serves blocks %d:%d far slower than it claims; re-routed to %s",
                hop.node.address,
                hop.start,
                hop.end,
                ", ".join(h.node.address for h in hops),
            )
            at = next(i for i, h in enumerate(self.hops) if h is hop)
            self.hops[at : at + 1] = hops
            self.reroutes += 1
            if hop.stream is not None:
                await hop.stream.close()
                hop.stream = None

    def _timed(self, hop: Hop, tokens: int, seconds: float, round_trips: float = 1.0) -> None:
        if self.speeds is not None and tokens <= MAX_TIMED_TOKENS:
            self.speeds.record(hop.node.address, hop.end - hop.start, seconds, round_trips)

    async def _hop_by_hop(self, hidden: torch.Tensor, position: int, rewind: bool) -> torch.Tensor:
        """The client drives every hop in turn: 2 x hops one-way legs per step; a failed hop is replaced."""
        tokens = hidden.shape[1]
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
        return hidden

    async def prefill(
        self, hidden: torch.Tensor, chunk: int | None = None, position: int | None = None
    ) -> torch.Tensor:
        """Like `step`, but a long input (B, T, H) flows through the chain in chunks of `chunk` tokens (default:
        the session's `prefill_chunk`), as a pipeline: the first hop works on chunk 2 while the second works
        on chunk 1. Each chunk is an ordinary step of each hop (kept in its history). If a hop fails midway,
        the whole input is sent again with `step`, which rewinds every hop to `position` and fails over.
        """
        await self._settle_ahead()
        chunk = self.prefill_chunk if chunk is None else chunk
        position = self.position if position is None else position
        tokens = _checked_tokens(hidden)
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

    def _pushed_into(self, hop: Hop) -> bool:
        """Whether `hop` gets its input pushed by the previous node rather than sent by this client: where the
        client's probe round trip to its node is at least `push_min_rtt`. A push saves the leg from the client
        to the node but costs messages of its own (the pushing node writes twice, the client reads its copy),
        about a millisecond of Python gRPC each: more than the leg saves on loopback or a LAN."""
        return hop.rtt >= self.push_min_rtt

    async def _pushed(self, hidden: torch.Tensor, position: int, rewind: bool) -> torch.Tensor:
        """`step` by node-to-node push: hop 0 gets the input, and every hop `_pushed_into` gets its step at
        once, waiting for the previous hop to push its output; any other hop gets its step from the client once
        the previous hop's reply is here. The client takes every hop's output (its copy, kept as the next hop's
        input in its history, and verified) and waits only for the last. A hop whose predecessor could not push
        gets its input from the client instead; a hop that fails is replaced as in `step`, and the client then
        sends its replacement's output on to the next hop itself."""
        tokens, timeout = hidden.shape[1], self.step_timeout
        try:
            keys = [await hop.node.audience(timeout) for hop in self.hops]
        except NotImplementedError:  # a node that cannot push (an in-process one): hop by hop from now on
            self.push = False
            return await self._hop_by_hop(hidden, position, rewind)
        except NodeError:  # a hop is unreachable: driven hop by hop, which fails over
            return await self._hop_by_hop(hidden, position, rewind)
        hops, n = list(self.hops), len(self.hops)
        into = [False] + [self._pushed_into(hop) for hop in hops[1:]]  # hop i's input comes by push from hop i - 1
        links = [os.urandom(16) for _ in range(n - 1)]  # the token hop i + 1 waits for, pushed by hop i
        pending: list[asyncio.Future | None] = [None] * n
        arrived = [0.0] * n  # time.perf_counter() at which each hop's reply came: a hop's time is the gap
        sent = [0.0] * n  # time.perf_counter() at which each hop's step left this client

        def send(i: int, first: torch.Tensor | None) -> asyncio.Future:
            target = PushTarget(hops[i + 1].node.address, keys[i + 1], links[i]) if i + 1 < n and into[i + 1] else None
            upstream = (links[i - 1], keys[i - 1]) if into[i] else (b"", b"")
            sent[i] = time.perf_counter()
            task = asyncio.ensure_future(self._open(hops[i]).pushed_step(first, position, timeout, target, *upstream))
            task.add_done_callback(_retrieved)  # a hop's error is handled where it is awaited, or when it is next used
            task.add_done_callback(functools.partial(_arrival, arrived, i))
            pending[i] = task
            return task

        for i in range(n):
            if i == 0 or into[i]:
                send(i, hidden if i == 0 else None)
        x, supply = hidden, False  # supply: the client sends hop i its input (its predecessor did not push it)
        try:
            for i, hop in enumerate(hops):
                if rewind:
                    _forget_from(hop, position)
                hop.history.append((position, x))
                try:
                    task = pending[i]
                    if task is None:  # not pushed into: the client sends this hop its input now
                        task = send(i, x)
                    elif supply:
                        await hop.node.push(links[i - 1], x, timeout)
                    reply: PushedStep = await task
                    if into[i] and reply.input_digest and reply.input_digest != tensor_digest(x.to(self.wire_dtype)):
                        # the previous node pushed something else than it returned (or this one says so): no
                        # more pushing in this session; this hop steps again from the client's copy (a rewind)
                        log.warning("%s got another input by push than the previous hop returned", hop.node.address)
                        self.push = False
                        out, supply = await self._send(hop, x, position), i + 1 < n
                    else:
                        pushed = into[i] and not supply  # its input came by push the moment the previous reply came
                        self.node_pushes += pushed
                        if not supply:
                            began, legs = (arrived[i - 1], 0.5) if pushed else (sent[i], 1.0)
                            self._timed(hop, tokens, arrived[i] - began, legs)
                        out, supply = reply.hidden, bool(reply.push_error) and i + 1 < n
                        if supply:
                            log.info(
                                "%s could not push (%s); sending its output on", hop.node.address, reply.push_error
                            )
                        if self.verifier is not None:  # with the input the node signed the digest of, if pushed
                            self.verifier.observe(hop, position, out, x.to(self.wire_dtype) if into[i] else None)
                except NodeError as error:
                    if task is not None and not task.done():
                        task.cancel()
                    replacement, out = await self._recover(hop, error)
                    at = next(j for j, h in enumerate(self.hops) if h is hop)
                    self.hops[at : at + 1] = replacement
                    out, supply = out[:, -tokens:], True
                x = out
        finally:
            for i, task in enumerate(pending):
                if task is not None and not task.done():  # given up: that hop's stream is out of lock step
                    task.cancel()
                    self._abandon(hops[i])
        return x

    def _open(self, hop: Hop) -> NodeSession:
        """The hop's session on its node, opened on first use."""
        if hop.stream is None:
            spec = SessionSpec(
                self.id,
                hop.start,
                hop.end,
                self.max_length,
                self.batch_size,
                self.wire_dtype,
                self.adapter,
                self.batch_steps,
            )
            hop.stream = hop.node.open_session(spec)
            if self.verifier is not None:
                hop.stream.keep_exchanges()  # a fraud proof's parts
        return hop.stream

    async def _send(self, hop: Hop, hidden: torch.Tensor, position: int) -> torch.Tensor:
        stream = self._open(hop)
        started = time.perf_counter()
        out = await stream.step(hidden, position, self.step_timeout)
        self._timed(hop, hidden.shape[1], time.perf_counter() - started)
        if self.verifier is not None:  # client/verification/verifier.py: checks every output before it is used
            self.verifier.observe(hop, position, out)
        return out

    async def _recover(self, failed: Hop, error: NodeError) -> tuple[list[Hop], torch.Tensor]:
        """New hops for the failed hop's blocks, with its history replayed; returns them and their output."""
        log.warning(
            "node %s failed on blocks %d:%d (%s); re-routing", failed.node.address, failed.start, failed.end, error
        )
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
        try:
            async for attempt in retrying:
                with attempt:
                    hops = await self.router(failed.start, failed.end)
                    out = await self._replay(hops, inputs)
                    log.warning(
                        "blocks %d:%d recovered on %s",
                        failed.start,
                        failed.end,
                        ", ".join(h.node.address for h in hops),
                    )
                    return hops, out
        except NoRouteError as e:  # say why the node that served these blocks failed: often the user can fix it
            e.args = (f"{e}; it failed with: {error}",)
            raise
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
        await self._settle_ahead()
        _forget_from(hop, keep)
        if keep > 0:
            replacement, _ = await self._recover(hop, NodeError(hop.node.address, "returned wrong outputs"))
        else:  # nothing to replay: the next step opens the new route
            self.on_failure(hop.node)
            self._abandon(hop)
            if self.router is None:
                raise NodeError(
                    hop.node.address, "returned wrong outputs, and this session has no router to replace it"
                )
            replacement = await self.router(hop.start, hop.end)
        i = next(i for i, h in enumerate(self.hops) if h is hop)
        self.hops[i : i + 1] = replacement

    def abort(self) -> None:
        """Drops every hop's stream now, without waiting for the nodes (the caller went away): each node sees
        the stream cancelled and frees the session's cache at once."""
        if self._ahead is not None:
            self._ahead.cancel()  # its hops are going: no failover for it
        for hop in self.hops:
            if hop.stream is not None:
                hop.stream.abort()

    async def close(self) -> None:
        await self._settle_ahead()
        if self.verifier is not None:
            await self.verifier.close()
        for hop in self.hops:
            if hop.stream is not None:
                await hop.stream.close()
                hop.stream = None


def _arrival(arrived: list[float], i: int, task: asyncio.Future) -> None:
    arrived[i] = time.perf_counter()


def _retrieved(task: asyncio.Future) -> None:
    """Marks a pushed step's exception as seen: if the step was given up on, its hop fails over later."""
    if not task.cancelled():
        task.exception()


def _forget_from(hop: Hop, position: int) -> None:
    """Forgets the hop's inputs from `position` on, cutting an entry that straddles it (a replay is one entry)."""
    hop.history = [(p, h[:, : position - p]) for p, h in hop.history if p < position]


def _checked_tokens(hidden: torch.Tensor) -> int:
    """The number of tokens in hidden states (B, T, H). An empty input is the caller's mistake (an empty prompt,
    or `cached` covering the whole prompt): said here, before any node sees it, because a node's refusal would
    read as the node failing and send the session looking for another route."""
    if hidden.dim() != 3 or hidden.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"nothing to send: hidden states of shape {list(hidden.shape)} (an empty prompt?)")
    return hidden.shape[1]
