"""Running a node: load the span, serve signed gRPC, and (in a swarm) announce, rebalance and drain.

Without a swarm (no --initial-peers, no --new-swarm) a node just serves the span it was given, for
clients that list it with --peers. In a swarm it also runs a DHT peer, picks its span where the swarm
is weakest unless told, keeps its record fresh, moves when another span would help the swarm much
more, and on SIGINT/SIGTERM announces `draining` and lets sessions in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from grpc import aio

from ..models.checkpoint import Checkpoint, resolve
from ..models.families import LAYER_PREFIX, load_span, num_blocks
from ..protocol import torchnode_pb2_grpc as pb_grpc
from ..protocol.dht_network import find_servers, start_dht, visible_maddrs
from ..protocol.dht_records import ServerRecord, latest_per_peer
from ..protocol.identity import Identity
from ..protocol.serving import bounded, until_signal
from ..protocol.signing import ReplayGuard
from ..protocol.version import __version__
from .announcer import DEFAULT_EXPIRATION, Announcer
from .auth_interceptor import AuthInterceptor
from ..protocol.coverage import coverage
from .block_selection import better_start, choose_start
from .limits import Limits
from .servicer import NodeServicer
from .span_backend import SpanBackend, SpanInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwarmConfig:
    initial_peers: tuple[str, ...] = ()  # empty: start a new swarm
    announce_host: str | None = None  # what others dial; default: the node's --host
    dht_port: int = 0
    num_blocks: int | None = None  # None: what fits max_memory
    max_memory: int | None = None  # bytes for weights; None: half of this machine's RAM
    expiration: float = DEFAULT_EXPIRATION
    rebalance_period: float = 120.0  # 0: never move
    rebalance_threshold: float = 0.25  # move if the weakest block gains more than this fraction


@dataclass(frozen=True)
class NodeConfig:
    model: str
    start: int | None  # None: choose (in a swarm) or 0
    end: int | None  # None: to the last block, or start + num_blocks when choosing
    host: str = "127.0.0.1"
    port: int = 31330
    dtype: torch.dtype = torch.float32
    quant: str = "none"  # "int8": linear weights stored in 8 bits (models.quantization.QUANT_MODES)
    identity_path: Path | None = None
    limits: Limits = field(default_factory=Limits)
    shutdown_grace: float = 10.0  # seconds in-flight sessions get to finish on SIGTERM
    swarm: SwarmConfig | None = None


def grpc_options(limits: Limits) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
    ]


def blocks_that_fit(ckpt: Checkpoint, dtype: torch.dtype, max_memory: int | None, quant: str = "none") -> int:
    """How many blocks' weights fit in `max_memory` bytes (default: half the machine's RAM)."""
    if max_memory is None:
        max_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    itemsize = 1 if quant == "int8" else dtype.itemsize  # int8: norms and per-row scales stay float, a rounding error
    per_block = ckpt.parameter_count(lambda k: k.startswith(f"{LAYER_PREFIX}0.")) * itemsize
    fits = max_memory // max(per_block, 1)
    if fits < 1:
        raise ValueError(f"--max-memory {max_memory} bytes holds no block ({per_block} bytes each)")
    return min(int(fits), num_blocks(ckpt))


def swarm_coverage(servers: dict[int, list[ServerRecord]], total: int, exclude: str):
    """Per-block coverage by other nodes; nodes still joining count at the swarm's typical throughput."""
    records = {p: r for p, r in latest_per_peer(servers).items() if p != exclude and r.state != "draining"}
    online = [r.throughput for r in records.values() if r.state == "online" and r.throughput > 0]
    nominal = sorted(online)[len(online) // 2] if online else 1.0
    spans = [(r.start, r.end, r.throughput if r.state == "online" else nominal) for r in records.values()]
    return coverage(spans, total)


class Node:
    def __init__(self, config: NodeConfig, on_status: Callable[[str], None]):
        self.config, self.on_status = config, on_status
        self.identity = Identity.load_or_create(config.identity_path)
        self.ckpt = resolve(config.model, on_status)
        self.total = num_blocks(self.ckpt)
        self.dht = None
        self.dht_maddrs: tuple[str, ...] = ()
        self.backend: SpanBackend | None = None
        self.servicer: NodeServicer | None = None
        self.port = config.port
        self.announcer: Announcer | None = None
        self.planned: tuple[int, int] = (0, 0)  # the span being loaded, announced while `joining`

    # ---- span
    def load_backend(self, start: int, end: int) -> SpanBackend:
        c = self.config
        weights = "" if c.quant == "none" else f" with {c.quant} weights"
        self.on_status(f"loading blocks {start}:{end} of {self.ckpt.name} ({self.total} blocks) as {c.dtype}{weights}")
        span = load_span(self.ckpt, start, end, c.dtype, c.quant)
        info = SpanInfo(self.ckpt.name, self.ckpt.revision, start, end, self.total, span.config.hidden_size, self.config.dtype)
        backend = SpanBackend(span, info, self.config.limits)
        self.on_status(f"measured {backend.measure_throughput():.1f} tokens/s over blocks {start}:{end}")
        return backend

    def record(self) -> ServerRecord:
        b, swarm = self.backend, self.config.swarm
        host = swarm.announce_host or self.config.host
        start, end = (b.info.start, b.info.end) if b else self.planned
        return ServerRecord(
            peer_id=self.identity.peer_id, public_key=self.identity.public_key, address=f"{host}:{self.port}",
            model=self.ckpt.name, revision=self.ckpt.revision, start=start, end=end, state="joining",
            total_blocks=self.total,
            throughput=b.throughput if b else 0.0,
            cache_bytes_free=b.cache_bytes_free if b else self.config.limits.cache_bytes,
            version=__version__, expiration=0.0, dht_maddrs=self.dht_maddrs,
        )  # fmt: skip

    async def servers(self) -> dict[int, list[ServerRecord]]:
        return await find_servers(self.dht, self.ckpt.name, self.total, return_future=True)

    async def choose_span(self) -> tuple[int, int]:
        c, swarm = self.config, self.config.swarm
        if c.start is not None:
            return c.start, c.end if c.end is not None else self.total
        if swarm is None:
            return 0, self.total
        n = swarm.num_blocks or blocks_that_fit(self.ckpt, c.dtype, swarm.max_memory, c.quant)
        start = choose_start(swarm_coverage(await self.servers(), self.total, self.identity.peer_id), n)
        return start, min(start + n, self.total)

    # ---- lifecycle
    async def run(self) -> None:
        c, swarm = self.config, self.config.swarm
        if swarm is not None:
            self.dht = await asyncio.to_thread(
                start_dht, list(swarm.initial_peers), c.host, swarm.dht_port, swarm.announce_host
            )
            self.dht_maddrs = tuple(visible_maddrs(self.dht))
            self.on_status(f"joined the DHT as {' '.join(self.dht_maddrs)}")
        self.planned = await self.choose_span()
        if swarm is not None:
            self.announcer = Announcer(self.dht, self.identity, self.record, swarm.expiration)
            await self.announcer.announce("joining")
        self.backend = await asyncio.to_thread(self.load_backend, *self.planned)
        server = aio.server(
            interceptors=[AuthInterceptor(self.identity, ReplayGuard(c.limits.max_clock_skew))],
            options=grpc_options(c.limits),
        )
        self.servicer = NodeServicer(self.backend, self.identity.public_key)
        pb_grpc.add_NodeServicer_to_server(self.servicer, server)
        self.port = server.add_insecure_port(f"{c.host}:{c.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {c.host}:{c.port} (port in use?)")
        await server.start()
        tasks = []
        if self.announcer is not None:
            await self.announcer.announce("online")
            tasks.append(asyncio.create_task(self.announcer.run_forever()))
            if swarm.rebalance_period > 0 and c.start is None:
                tasks.append(asyncio.create_task(self.rebalance_forever()))
        b = self.backend.info
        self.on_status(
            f"ready: serving blocks {b.start}:{b.end} of {self.ckpt.name} on {c.host}:{self.port} "
            f"as peer {self.identity.peer_id}"
        )
        await until_signal()
        self.on_status(f"draining: finishing sessions in flight (up to {c.shutdown_grace:.0f}s); signal again to quit now")
        for task in tasks:
            task.cancel()
        # each step is bounded: an unreachable DHT must not keep a leaving node alive
        if self.announcer is not None:
            await bounded(self.announcer.announce("draining"), "announcing draining")
        await server.stop(c.shutdown_grace)
        self.backend.shutdown()
        if self.dht is not None:
            await bounded(asyncio.to_thread(self.dht.shutdown), "stopping the DHT")
            if self.dht.is_alive():
                self.dht.kill()
        self.on_status("stopped")

    async def rebalance_forever(self) -> None:
        swarm = self.config.swarm
        while True:
            await asyncio.sleep(swarm.rebalance_period)
            try:
                await self.rebalance_once()
            except Exception as e:  # a failed check is retried next period; serving goes on
                log.warning("rebalance check failed: %s", e)

    async def rebalance_once(self) -> None:
        b = self.backend.info
        n = b.end - b.start
        others = swarm_coverage(await self.servers(), self.total, self.identity.peer_id)
        start = better_start(others, b.start, n, self.backend.throughput, self.config.swarm.rebalance_threshold)
        if start is None:
            return
        self.on_status(f"rebalancing: moving from blocks {b.start}:{b.end} to {start}:{start + n}")
        old = self.backend
        self.backend = await asyncio.to_thread(self.load_backend, start, start + n)
        self.servicer.backend = self.backend  # new streams use the new span; open ones keep the old one
        await self.announcer.announce("online")
        self.on_status(f"ready: serving blocks {start}:{start + n} of {self.ckpt.name} on port {self.port}")
        asyncio.create_task(_retire(old))


async def _retire(backend: SpanBackend) -> None:
    """Frees an old span's compute thread once its last session has closed."""
    while backend.sessions:
        await asyncio.sleep(1.0)
    await asyncio.to_thread(backend.shutdown)


async def serve(config: NodeConfig, on_status: Callable[[str], None] = log.info) -> None:
    await Node(config, on_status).run()
