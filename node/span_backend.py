"""What a node does with requests, free of gRPC: checks inputs, runs the span, keeps session KV caches.

All torch work runs on one runner thread. Steps of all sessions (and stateless passes) queue in the
scheduler (node/scheduler.py), which decides what runs together; the runner executes each batch as one
pass over the span (`Span.forward_batch`: the linear layers see every session's tokens at once, attention
runs per session against its own cache) and hands each step its output. The event loop stays free to
answer `Info` and read the next messages meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..models import torch_threads
from ..models.kv_cache import KVCache, cache_bytes
from ..models.lora import AdapterBank, Lora, UnknownAdapter, lora_pass
from ..protocol import version
from ..protocol.version import __version__
from ..protocol.wire import tensor_codec
from ..protocol.wire.node_client import NodeInfo
from . import fair_share
from .errors import Evicted, NotFound, OutOfRange, RequestError, ResourceExhausted
from .kv_slabs import KVSlabs, Slot
from .limits import Limits
from .scheduler import Batch, Scheduler, Work

REPLY_OVERHEAD = 4096  # bytes of a reply beside its tensor data: envelope, session id, shape
RECENT_SECONDS = 30.0  # served steps older than this no longer describe the node's load
IDLE_SECONDS = 2.0  # Info reports batch size 0 after this long without a batch
EMA_WEIGHT = 0.1  # weight of the newest batch in the served-speed averages


@dataclass
class Session:
    id: str
    start: int
    end: int
    batch: int
    max_length: int
    nbytes: int
    caches: list[KVCache] = field(default_factory=list)
    slot: Slot | None = None  # its caches' slot in a shared slab (node/kv_slabs.py); None: tensors of its own
    length: int = 0  # tokens in the cache
    next_step: int = 0
    lora: Lora | None = None  # the adapter this session named (models/lora.py), applied to its rows of each batch
    client: bytes = b""  # the key of the client that opened it (its fair share: node/fair_share.py)
    last_used: float = field(default_factory=time.monotonic)  # time.monotonic() of its latest step
    busy: bool = False  # a step of it is queued or running
    evicted: str = ""  # why the node evicted it (its next step is refused with this)


@dataclass(frozen=True)
class SpanInfo:
    model: str
    revision: str
    start: int
    end: int
    total_blocks: int
    hidden_size: int
    dtype: torch.dtype
    quant: str = "none"  # weight quantization (--quant): what a verifying client must recompute with


class ServedSpeed:
    """Decode speed of the whole span per session, from the batches the node actually runs.

    A figure measured once at start-up is noisy (nodes loading side by side measured 12 and 107 tokens/s
    for equal spans) and says nothing about load. This keeps two moving averages from served decode
    batches, scaled to the whole span: `alone` (batches of one sequence) and `busy` (batches of several:
    what each session gets at the node's usual batch, whose size is kept too).
    """

    def __init__(self, span_blocks: int):
        self.span_blocks = span_blocks
        self.alone: float | None = None  # tokens/s per session at batch 1
        self.busy: float | None = None  # tokens/s per session at the usual batch
        self.usual_batch = 0.0  # sequences per busy batch, averaged
        self.busy_at = self.last_at = -float("inf")  # time.monotonic() of the last busy batch / any batch
        self.last_sequences = 0
        self.batches = self.sequences = 0  # every batch run, and their sequences: a reader's mean batch size

    def record(self, batch: Batch, seconds: float) -> None:
        self.last_at, self.last_sequences = time.monotonic(), sum(c.work.rows for c in batch.chunks)
        self.batches, self.sequences = self.batches + 1, self.sequences + self.last_sequences
        if any(c.tokens != 1 for c in batch.chunks) or seconds <= 0:
            return  # prefill chunks and multi-token steps are not decode speed
        speed = (batch.end - batch.start) / (seconds * self.span_blocks)  # tokens/s over the whole span
        if self.last_sequences == 1:
            self.alone = _average(self.alone, speed)
        else:
            self.busy, self.busy_at = _average(self.busy, speed), self.last_at
            self.usual_batch = _average(self.usual_batch or None, self.last_sequences)

    def current(self, fallback: float) -> float:
        """What routing should expect now: the busy speed while the node is busy, else the speed alone."""
        if self.busy is not None and time.monotonic() - self.busy_at < RECENT_SECONDS:
            return self.busy
        return self.alone if self.alone is not None else fallback

    @property
    def batch_size(self) -> int:
        """Sequences in the latest batch; 0 once the node has been idle for IDLE_SECONDS."""
        return self.last_sequences if time.monotonic() - self.last_at < IDLE_SECONDS else 0


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA_WEIGHT) * old + EMA_WEIGHT * new


class SpanBackend:
    def __init__(self, span: torch.nn.Module, info: SpanInfo, limits: Limits, adapters: AdapterBank | None = None):
        self.span, self.info, self.limits = span, info, limits
        self.adapters = adapters  # LoRA adapters served per session (--adapters)
        self.sessions: dict[str, Session] = {}
        self.cache_bytes_used = 0
        self.throughput = 0.0  # tokens/s announced: measured after start-up, then `refresh_throughput`
        self.speed = ServedSpeed(info.end - info.start)
        self.scheduler = Scheduler(
            limits.max_batch_tokens, limits.batch_wait, lambda: max(1, len(self.sessions)), fair=limits.fair_share
        )
        self.evictions = 0  # sessions evicted to give other client keys their fair share
        self.served_tokens = 0  # sessions' tokens its blocks computed since start (once per pass): credit
        self.served_sessions = 0  # sessions opened since start
        self._delivered: list[tuple[asyncio.AbstractEventLoop, asyncio.Future, torch.Tensor | BaseException]] = []
        self._runner = threading.Thread(target=self._run_batches, name="torchnode-runner", daemon=True)
        self._runner.start()
        config = span.config
        self._kv_shape = dict(kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=info.dtype)
        self.slabs = KVSlabs(span, limits.cache_bytes, limits.slab_slots)

    @property
    def cache_bytes_free(self) -> int:
        return self.limits.cache_bytes - self.cache_bytes_used

    def describe(self, public_key: bytes) -> NodeInfo:
        """What `Info` answers: the span, its checkpoint and the node's current load."""
        i = self.info
        return NodeInfo(
            model=i.model,
            revision=i.revision,
            start_block=i.start,
            end_block=i.end,
            total_blocks=i.total_blocks,
            hidden_size=i.hidden_size,
            dtype=tensor_codec.dtype_name(i.dtype),
            quant=i.quant,
            throughput=self.throughput,
            cache_bytes_free=self.cache_bytes_free,
            sessions_free=self.limits.max_sessions - len(self.sessions),
            version=__version__,
            public_key=public_key,
            max_message_bytes=self.limits.max_message_bytes,
            batch_size=self.speed.batch_size,
            queue_length=self.scheduler.queue_length,
            adapters=self.adapters.names if self.adapters else (),
            protocol=version.protocol(),
            asyncio_tasks=_loop_tasks(),
            batches_run=self.speed.batches,
            sequences_run=self.speed.sequences,
        )

    def refresh_throughput(self) -> float:
        """Sets the announced tokens/s from the steps served lately (unchanged while none were)."""
        self.throughput = self.speed.current(self.throughput)
        return self.throughput

    # ---- checks shared by Forward and Inference
    def check_span(self, start: int, end: int) -> None:
        if not self.info.start <= start < end <= self.info.end:
            raise NotFound(
                f"blocks {start}:{end} are not served here: this node serves {self.info.start}:{self.info.end}"
            )

    def check_hidden(self, x: torch.Tensor, batch: int | None = None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.info.hidden_size:
            raise RequestError(
                f"hidden states must have shape (batch, tokens, {self.info.hidden_size}), got {list(x.shape)}"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise RequestError(f"hidden states are empty: shape {list(x.shape)}")
        if batch is not None and x.shape[0] != batch:
            raise RequestError(f"session was opened with batch size {batch}, got hidden states of batch {x.shape[0]}")
        if x.shape[1] > self.limits.max_session_tokens:
            raise OutOfRange(
                f"{x.shape[1]} tokens in one request; this node allows {self.limits.max_session_tokens} "
                "(--max-session-tokens)"
            )
        if not torch.isfinite(x).all():
            raise RequestError("hidden states contain NaN or infinity")

    def check_reply(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        """Refuses up front a request whose reply gRPC could not send (--max-message-size), e.g. bf16 in, fp32 out."""
        nbytes = x.numel() * dtype.itemsize + REPLY_OVERHEAD
        if nbytes > self.limits.max_message_bytes:
            raise ResourceExhausted(
                f"the reply would take about {nbytes} bytes, over this node's {self.limits.max_message_bytes} "
                "(--max-message-size): send fewer tokens or ask for a smaller wire_dtype"
            )

    # ---- running: the scheduler decides what runs together, the runner thread executes batches
    async def _submit(
        self,
        x: torch.Tensor,
        position: int,
        start: int,
        end: int,
        caches: list,
        session_id: str | None = None,
        client: bytes = b"",
    ) -> torch.Tensor:
        """Queues a step and waits for its output (B, T, hidden), however the scheduler batches or cuts it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def deliver(result: torch.Tensor | BaseException) -> None:
            if threading.current_thread() is self._runner:  # handed over with the batch's others (_hand_over)
                self._delivered.append((loop, future, result))
            else:  # a step still queued when the node shut down
                _call_soon(loop, _settle_all, [(future, result)])

        self.scheduler.submit(Work(x, position, start, end, caches, deliver, session_id, client))
        return await future

    def _run_batches(self) -> None:
        torch_threads.enter()  # the node's one long-lived compute thread
        while (batch := self.scheduler.next_batch()) is not None:
            chunks = batch.chunks
            started = time.perf_counter()
            # each session's adapter applies to its own rows of the packed pass (per-sequence LoRA)
            loras = [self._lora_of(c.work.session_id) for c in chunks]
            try:
                with lora_pass([c.work.rows * c.tokens for c in chunks], loras):
                    outputs: list[torch.Tensor] | BaseException = self.span.forward_batch(
                        [c.x for c in chunks],
                        [c.position for c in chunks],
                        batch.start,
                        batch.end,
                        [c.work.caches for c in chunks],
                    )
            except Exception as e:  # handed to every step of the batch; the runner carries on
                outputs = e
            else:
                # credit: sessions' tokens only (a stateless Forward is a probe or a check, not a user's text)
                self.served_tokens += sum(c.tokens * c.work.rows for c in chunks if c.work.session_id is not None)
            self.speed.record(batch, time.perf_counter() - started)
            self.scheduler.finish(batch, outputs)
            self._hand_over()

    def _hand_over(self) -> None:
        """A batch's outputs go to their event loop in one callback, not one each: its steps' replies then
        leave together (a StepBatches stream answers every step finished by the time the loop gets to it)."""
        delivered, self._delivered = self._delivered, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, future, result in delivered:
            by_loop.setdefault(loop, []).append((future, result))
        for loop, settled in by_loop.items():
            _call_soon(loop, _settle_all, settled)

    def _lora_of(self, session_id: str | None) -> Lora | None:
        session = self.sessions.get(session_id) if session_id is not None else None
        return session.lora if session is not None else None

    # ---- stateless pass
    async def forward(
        self, x: torch.Tensor, start: int, end: int, reply_dtype: torch.dtype | None = None, client: bytes = b""
    ) -> torch.Tensor:
        """client: the caller's key, for its share of compute (node/scheduler.py)."""
        self.check_span(start, end)
        self.check_hidden(x)
        self.check_reply(x, reply_dtype or x.dtype)
        caches = self.span.new_caches(start, end, x.shape[0], x.shape[1])  # its own, so it can run in chunks
        return await self._submit(x, 0, start, end, caches, client=client)

    # ---- sessions
    def open_session(
        self,
        session_id: str,
        start: int,
        end: int,
        batch: int,
        max_length: int,
        adapter: str = "",
        client: bytes = b"",
    ) -> Session:
        """adapter: the name of a served LoRA adapter this session runs with (empty: the base model).
        client: the key of the client opening it; on a full node it gets its fair share (node/fair_share.py)."""
        lora = self.lora(adapter) if adapter else None
        if not session_id or len(session_id) > 128:
            raise RequestError("session_id must be 1..128 characters")
        self.check_span(start, end)
        if not 1 <= batch <= 1024:
            raise RequestError(f"batch_size must be in 1..1024, got {batch}")
        if not 1 <= max_length <= self.limits.max_session_tokens:
            raise OutOfRange(
                f"max_length must be in 1..{self.limits.max_session_tokens} (--max-session-tokens), got {max_length}"
            )
        if session_id in self.sessions:
            raise RequestError(f"session {session_id!r} is already open on this node")
        in_slab = self.slabs.takes(batch)
        length = self.slabs.stride(max_length) if in_slab else max_length  # a slab slot: rounded up (node/kv_slabs.py)
        nbytes = cache_bytes(layers=end - start, batch=batch, max_length=length, **self._kv_shape)

        def needed() -> int:  # what opening it adds to the budget now (a freed slab slot: nothing)
            return self.slabs.new_bytes(start, end, max_length, nbytes) if in_slab else nbytes

        why = self._make_room(client, nbytes, needed) if self.limits.fair_share else ""
        if len(self.sessions) >= self.limits.max_sessions:
            raise ResourceExhausted(f"node is full: {len(self.sessions)} sessions open (--max-sessions){why}")
        free, added = self.limits.cache_bytes - self.cache_bytes_used, needed()
        if added > free:
            raise ResourceExhausted(
                f"KV cache budget exhausted: session needs {nbytes} bytes, {free} of {self.limits.cache_bytes} "
                f"free (--cache-memory){why}"
            )
        session = Session(session_id, start, end, batch, max_length, nbytes, lora=lora, client=client)
        if in_slab:
            session.slot, session.caches = self.slabs.take(start, end, max_length, nbytes)
        else:
            session.caches = self.span.new_caches(start, end, batch, max_length)
        self.sessions[session_id] = session
        self.cache_bytes_used += added
        self.served_sessions += 1
        return session

    def lora(self, adapter: str) -> Lora:
        """A served adapter's weights over this span; NotFound naming it otherwise."""
        if self.adapters is None:
            raise NotFound(f"adapter {adapter!r} is not served by this node (it serves none)")
        try:
            return self.adapters.get(adapter)
        except UnknownAdapter as e:
            raise NotFound(str(e)) from None

    def _make_room(self, client: bytes, nbytes: int, needed: Callable[[], int]) -> str:
        """Evicts other keys' sessions beyond their fair share until a session of `nbytes` for `client` fits, its
        `needed()` bytes within the budget (node/fair_share.py); returns why it could not ("" when it fits or
        nothing was beyond a share)."""
        limits = self.limits
        while True:
            need_slot = len(self.sessions) >= limits.max_sessions
            need_bytes = needed() > limits.cache_bytes - self.cache_bytes_used
            if not (need_slot or need_bytes):
                return ""
            open_ = list(self.sessions.values())
            holdings = [fair_share.Holding(s.client, s.nbytes, s.last_used, s.busy) for s in open_]
            refused = fair_share.refusal(holdings, client, nbytes, limits.max_sessions, limits.cache_bytes)
            if refused:
                return f": {refused}"
            i = fair_share.victim(holdings, client, need_slot, need_bytes, limits.max_sessions, limits.cache_bytes)
            if i is None:
                return ""
            self.evict(
                open_[i],
                "its client held more than its fair share of this node (--max-sessions, "
                "--cache-memory); another client key needed room",
            )

    def evict(self, session: Session, why: str) -> None:
        """Closes `session` for another client: its stream stays, and its next step is refused with `why`."""
        session.evicted = why
        self.evictions += 1
        self.close_session(session)

    def close_session(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.scheduler.drop(session.id)
            self.cache_bytes_used -= session.nbytes if session.slot is None else self.slabs.release(session.slot)
            session.caches.clear()

    async def step(
        self, session: Session, step: int, x: torch.Tensor | None, position: int, reply_dtype: torch.dtype | None = None
    ) -> torch.Tensor | None:
        """Runs new tokens at `position` (<= cached length: a smaller one rewinds, for speculative decoding)."""
        if session.evicted:
            raise Evicted(f"session {session.id!r} evicted: {session.evicted}")
        if step != session.next_step:
            raise RequestError(f"step out of order: expected step {session.next_step}, got {step}")
        session.next_step += 1
        if x is None:
            return None
        self.check_hidden(x, session.batch)
        if position < 0:
            raise OutOfRange(f"position must not be negative, got {position}")
        if position > session.length:
            raise OutOfRange(f"position {position} is past the {session.length} cached tokens")
        if position + x.shape[1] > session.max_length:
            raise OutOfRange(
                f"session max_length {session.max_length} exceeded: position {position} + {x.shape[1]} tokens"
            )
        self.check_reply(x, reply_dtype or x.dtype)
        session.busy = True
        try:
            out = await self._submit(
                x, position, session.start, session.end, list(session.caches), session.id, session.client
            )
        finally:
            session.busy, session.last_used = False, time.monotonic()
        session.length = position + x.shape[1]
        return out

    def measure_throughput(self, steps: int = 8) -> float:
        """Decode tokens/s of the whole span at batch 1: what the node announces and routing weighs."""
        caches = self.span.new_caches(self.info.start, self.info.end, 1, steps + 1)
        x = torch.zeros(1, 1, self.info.hidden_size, dtype=self.info.dtype)
        self.span(x, 0, self.info.start, self.info.end, caches)  # warm-up
        started = time.perf_counter()
        for i in range(1, steps + 1):
            self.span(x, i, self.info.start, self.info.end, caches)
        self.throughput = steps / (time.perf_counter() - started)
        return self.throughput

    def shutdown(self) -> None:
        self.scheduler.close()
        self._runner.join()


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the caller's event loop is gone: nobody is waiting
        pass


def _settle_all(settled: list[tuple[asyncio.Future, torch.Tensor | BaseException]]) -> None:
    for future, result in settled:
        if future.done():  # the caller gave up (its stream closed)
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _loop_tasks() -> int:
    """Tasks alive in the running event loop (0 outside one): a count that grows over days is a leak."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0
