"""What a node does with requests, free of gRPC: checks inputs, runs the span, keeps session KV caches.

All torch work runs on one compute thread, so sessions interleave step by step without fighting over
the cores, and the event loop stays free to answer `Info` and read the next messages meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..models.kv_cache import KVCache, cache_bytes
from ..protocol import tensor_codec
from ..protocol.node_client import NodeInfo
from ..protocol.version import __version__
from .errors import NotFound, OutOfRange, RequestError, ResourceExhausted
from .limits import Limits

REPLY_OVERHEAD = 4096  # bytes of a reply beside its tensor data: envelope, session id, shape


@dataclass
class Session:
    id: str
    start: int
    end: int
    batch: int
    max_length: int
    nbytes: int
    caches: list[KVCache] = field(default_factory=list)
    length: int = 0  # tokens in the cache
    next_step: int = 0


@dataclass(frozen=True)
class SpanInfo:
    model: str
    revision: str
    start: int
    end: int
    total_blocks: int
    hidden_size: int
    dtype: torch.dtype


class SpanBackend:
    def __init__(self, span: torch.nn.Module, info: SpanInfo, limits: Limits):
        self.span, self.info, self.limits = span, info, limits
        self.sessions: dict[str, Session] = {}
        self.cache_bytes_used = 0
        self.throughput = 0.0  # tokens/s, measured by the caller after start-up
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchnode-compute")
        config = span.config
        self._kv_shape = dict(kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=info.dtype)

    @property
    def cache_bytes_free(self) -> int:
        return self.limits.cache_bytes - self.cache_bytes_used

    def describe(self, public_key: bytes) -> NodeInfo:
        """What `Info` answers: the span, its checkpoint and the node's current load."""
        i = self.info
        return NodeInfo(
            model=i.model, revision=i.revision, start_block=i.start, end_block=i.end, total_blocks=i.total_blocks,
            hidden_size=i.hidden_size, dtype=tensor_codec.dtype_name(i.dtype), throughput=self.throughput,
            cache_bytes_free=self.cache_bytes_free, sessions_free=self.limits.max_sessions - len(self.sessions),
            version=__version__, public_key=public_key, max_message_bytes=self.limits.max_message_bytes,
        )  # fmt: skip

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

    async def _run(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn)

    # ---- stateless pass
    async def forward(
        self, x: torch.Tensor, start: int, end: int, reply_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        self.check_span(start, end)
        self.check_hidden(x)
        self.check_reply(x, reply_dtype or x.dtype)
        return await self._run(lambda: self.span(x, 0, start, end))

    # ---- sessions
    def open_session(self, session_id: str, start: int, end: int, batch: int, max_length: int) -> Session:
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
        if len(self.sessions) >= self.limits.max_sessions:
            raise ResourceExhausted(f"node is full: {len(self.sessions)} sessions open (--max-sessions)")
        nbytes = cache_bytes(layers=end - start, batch=batch, max_length=max_length, **self._kv_shape)
        free = self.limits.cache_bytes - self.cache_bytes_used
        if nbytes > free:
            raise ResourceExhausted(
                f"KV cache budget exhausted: session needs {nbytes} bytes, {free} of {self.limits.cache_bytes} "
                "free (--cache-memory)"
            )
        session = Session(session_id, start, end, batch, max_length, nbytes)
        session.caches = self.span.new_caches(start, end, batch, max_length)
        self.sessions[session_id] = session
        self.cache_bytes_used += nbytes
        return session

    def close_session(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.cache_bytes_used -= session.nbytes
            session.caches.clear()

    async def step(
        self, session: Session, step: int, x: torch.Tensor | None, position: int, reply_dtype: torch.dtype | None = None
    ) -> torch.Tensor | None:
        """Runs new tokens at `position` (<= cached length: a smaller one rewinds, for speculative decoding)."""
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
        out = await self._run(lambda: self.span(x, position, session.start, session.end, session.caches))
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
        self._compute.shutdown(wait=True)
