"""Running a node: load the span, serve signed gRPC, and (in a swarm) announce, rebalance and drain.

Without a swarm (no --initial-peers, no --new-swarm) a node just serves the span it was given, for
clients that list it with --peers. In a swarm it also runs a DHT peer, picks its span where the swarm
is weakest unless told, keeps its record fresh, moves when another span would help the swarm much
more, and on SIGINT/SIGTERM announces `draining` and lets sessions in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import torch
from grpc import aio

from ..models import torch_threads
from ..models.checkpoint import Checkpoint, resolve
from ..models.devices import free_memory, place
from ..models.families import LAYER_PREFIX, load_span, num_blocks
from ..models.huge_pages import move_into_huge_pages
from ..models.lora import AdapterBank, AdapterError, find_adapter
from ..models.quantization import GROUP_SIZE
from ..protocol import version
from ..protocol.dht.coverage import coverage
from ..protocol.dht.network import find_servers, start_dht, visible_maddrs
from ..protocol.dht.records import ServerRecord, latest_per_peer
from ..protocol.serving import bounded, until_signal
from ..protocol.version import __version__
from ..protocol.wire import tensor_codec, tls
from ..protocol.wire import torchnode_pb2_grpc as pb_grpc
from ..protocol.wire.identity import Identity, default_identity_path
from ..protocol.wire.signing import ReplayGuard
from .allow_list import allow_list
from .announcer import Announcer
from .auth_interceptor import AuthInterceptor
from .block_selection import better_start, choose_start
from .config import NodeConfig
from .limits import Limits
from .push import Pusher
from .reachability import establish
from .relay import serve_relay
from .servicer import NodeServicer
from .span_backend import SpanBackend, SpanInfo

log = logging.getLogger(__name__)

THROUGHPUT_REFRESH_SECONDS = 5.0  # how often the announced tokens/s is updated from served steps
LEAVE_STEP_SECONDS = 1.0  # the longest announcing `draining` (after sessions end) or stopping the DHT may take


def grpc_options(limits: Limits) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
    ]


# What a node process needs besides its weights and its KV cache budget (`--max-memory` covers all three):
# on the CPU, Python + torch + transformers + gRPC + the DHT client after imports (~430-460 MiB measured),
# the transient of loading (one tensor as stored plus as converted), and the activations of one batch of
# --max-batch-tokens (a 256-token chunk against a long context); on a GPU, activations and the allocator's
# slack on the device (the process's RAM is the host's, outside --max-memory).
RUNTIME_ALLOWANCE = {"cpu": 768 << 20, "cuda": 1 << 30, "mps": 768 << 20}
# A quantized node reads each block in its float dtype, then rounds it: the block as read and as converted and
# the rounding's temporaries peak near two float blocks (Llama-3.2-3B's shape: +0.45 GiB over one reserved).
QUANT_LOADING_BLOCKS = 2


def weight_budget(max_memory: int | None, cache_bytes: int, device: torch.device | str = "cpu") -> int:
    """Bytes left for weights when the node may use `max_memory` in all (default: the device's free memory,
    or half the RAM on the CPU): what remains after the KV cache budget (--cache-memory) and the runtime
    allowance of the device type. Raises ValueError naming the flags when nothing is left."""
    device = torch.device(device)
    total = free_memory(device) if max_memory is None else max_memory
    allowance = RUNTIME_ALLOWANCE.get(device.type, RUNTIME_ALLOWANCE["cpu"])
    left = total - cache_bytes - allowance
    if left <= 0:
        raise ValueError(
            f"--max-memory {total / 2**20:.0f} MiB leaves nothing for weights after the KV cache budget "
            f"(--cache-memory {cache_bytes / 2**20:.0f} MiB) and the runtime allowance ({allowance >> 20} MiB on "
            f"{device.type}): raise --max-memory or lower --cache-memory"
        )
    return left


def blocks_that_fit(ckpt: Checkpoint, dtype: torch.dtype, weight_bytes: int, quant: str = "none") -> int:
    """How many blocks' weights fit in `weight_bytes` (what `weight_budget` leaves for them), at `quant`'s
    bytes per weight (norms, scales and zeros are a rounding error). A quantized span is loaded block by block,
    each read in `dtype` and then quantized, so QUANT_LOADING_BLOCKS blocks in `dtype` are reserved for that."""
    itemsize = {"int8": 1.0, "int4": 0.5 + 4 / GROUP_SIZE, "nf4": 0.5}.get(quant, dtype.itemsize)
    params = ckpt.parameter_count(lambda k: k.startswith(f"{LAYER_PREFIX}0."))
    per_block = params * itemsize
    loading = 0 if quant == "none" else QUANT_LOADING_BLOCKS * params * dtype.itemsize
    fits = (weight_bytes - loading) // max(per_block, 1)
    if fits < 1:
        raise ValueError(
            f"--max-memory leaves {weight_bytes / 2**20:.0f} MiB for weights, less than one block "
            f"({per_block / 2**20:.0f} MiB at {quant if quant != 'none' else dtype}): raise --max-memory"
        )
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
        cert_path = tls.certificate_path(config.identity_path or default_identity_path())
        self.certificate = None if config.insecure else tls.load_or_create(self.identity, cert_path)
        self.ckpt = resolve(config.model, on_status)
        self.adapters = [find_adapter(a) for a in config.adapters]  # checked before joining: bad ones fail here
        if len({a.name for a in self.adapters}) != len(self.adapters):
            raise AdapterError(f"--adapters names an adapter twice: {', '.join(a.name for a in self.adapters)}")
        self.total = num_blocks(self.ckpt)
        self.dht = None
        self.dht_maddrs: tuple[str, ...] = ()
        self.backend: SpanBackend | None = None
        self.servicer: NodeServicer | None = None
        self.port = config.port
        self.announcer: Announcer | None = None
        self.planned: tuple[int, int] = (0, 0)  # the span being loaded, announced while `joining`
        self.relayed = None  # protocol.relay_link.Registration while served through a relay
        self.created = time.monotonic()  # the uptime the record announces counts from here

    # ---- span
    def load_backend(self, start: int, end: int) -> SpanBackend:
        c = self.config
        weights = "" if c.quant == "none" else f" with {c.quant} weights"
        self.on_status(
            f"loading blocks {start}:{end} of {self.ckpt.name} ({self.total} blocks) on {c.device} "
            f"as {c.dtype}{weights}"
        )
        span = place(
            load_span(self.ckpt, start, end, c.dtype, c.quant, c.device, self.on_status), c.device
        )  # KV caches too
        if c.huge_pages and (moved := move_into_huge_pages(span)):  # CPU tensors only: nothing moves on a GPU
            self.on_status(f"weights in huge pages ({moved / 2**20:.0f} MiB)")
        info = SpanInfo(
            self.ckpt.name, self.ckpt.revision, start, end, self.total, span.config.hidden_size, c.dtype, c.quant
        )
        adapters = AdapterBank(span, start, end, self.adapters) if self.adapters else None  # their span's tensors only
        backend = SpanBackend(span, info, self.config.limits, adapters)
        self.on_status(f"measured {backend.measure_throughput():.1f} tokens/s over blocks {start}:{end} on {c.device}")
        return backend

    def record(self) -> ServerRecord:
        b, swarm = self.backend, self.config.swarm
        host = swarm.announce_host or self.config.host
        start, end = (b.info.start, b.info.end) if b else self.planned
        return ServerRecord(
            peer_id=self.identity.peer_id,
            public_key=self.identity.public_key,
            address=self.relayed.address if self.relayed else f"{host}:{self.port}",
            relay=self.relayed.relay.peer_id if self.relayed else "",
            model=self.ckpt.name,
            revision=self.ckpt.revision,
            start=start,
            end=end,
            state="joining",
            total_blocks=self.total,
            throughput=b.throughput if b else 0.0,
            cache_bytes_free=b.cache_bytes_free if b else self.config.limits.cache_bytes,
            version=__version__,
            expiration=0.0,
            dht_maddrs=self.dht_maddrs,
            adapters=tuple(a.name for a in self.adapters),
            protocol=version.protocol(),
            dtype=tensor_codec.dtype_name(self.config.dtype),
            quant=self.config.quant,
            public_name=swarm.public_name if swarm else "",
            contact=swarm.contact if swarm else "",
            served_tokens=b.served_tokens if b else 0,
            served_sessions=b.served_sessions if b else 0,
            uptime=time.monotonic() - self.created,
        )

    async def servers(self) -> dict[int, list[ServerRecord]]:
        return await find_servers(self.dht, self.ckpt.name, self.total, return_future=True)

    async def choose_span(self) -> tuple[int, int]:
        c, swarm = self.config, self.config.swarm
        if c.start is not None:
            return c.start, c.end if c.end is not None else self.total
        if swarm is None:
            return 0, self.total
        if swarm.num_blocks:
            n = swarm.num_blocks
        else:
            weights = weight_budget(swarm.max_memory, c.limits.cache_bytes, c.device)
            n = blocks_that_fit(self.ckpt, c.dtype, weights, c.quant)
        start = choose_start(swarm_coverage(await self.servers(), self.total, self.identity.peer_id), n)
        return start, min(start + n, self.total)

    # ---- lifecycle
    async def run(self) -> None:
        c, swarm = self.config, self.config.swarm
        if swarm is not None:
            self.dht = await asyncio.to_thread(
                start_dht,
                list(swarm.initial_peers),
                c.host,
                swarm.dht_port,
                swarm.announce_host,
                client_mode=swarm.reachable == "no",
                allow_keys=c.allow_keys,  # no inbound: a DHT client only
            )
            self.dht_maddrs = tuple(visible_maddrs(self.dht))
            self.on_status(f"joined the DHT as {' '.join(self.dht_maddrs)}")
        self.planned = await self.choose_span()
        if swarm is not None:
            family = self.ckpt.hf_config.model_type  # for the model index entry
            self.announcer = Announcer(
                self.dht,
                self.identity,
                self.record,
                swarm.expiration,
                family=family,
                adapters=lambda: tuple(a.name for a in self.adapters),
            )
            await self.announcer.announce("joining")
        self.backend = await torch_threads.in_passing_thread(self.load_backend, *self.planned)
        server = aio.server(
            interceptors=[
                AuthInterceptor(self.identity, ReplayGuard(c.limits.max_clock_skew)),
                *allow_list(c.allow_keys),
            ],
            options=grpc_options(c.limits),
        )
        self.servicer = NodeServicer(
            self.backend, self.identity.public_key, Pusher(self.identity, c.insecure, c.limits.push_timeout)
        )
        pb_grpc.add_NodeServicer_to_server(self.servicer, server)
        self.port = self.listen(server)
        if self.port == 0:
            raise OSError(f"cannot listen on {c.host}:{c.port} (port in use?)")
        await server.start()
        tasks = [asyncio.create_task(self.track_throughput())]
        if self.announcer is not None:
            tasks += await self.reach_and_relay()
            await self.announcer.announce("online")
            tasks.append(asyncio.create_task(self.announcer.run_forever()))
            if swarm.rebalance_period > 0 and c.start is None:
                tasks.append(asyncio.create_task(self.rebalance_forever()))
        b = self.backend.info
        self.on_status(
            f"ready: serving blocks {b.start}:{b.end} of {self.ckpt.name} on {c.host}:{self.port} "
            f"as peer {self.identity.peer_id} ({'plaintext, --insecure' if c.insecure else 'TLS'})"
        )
        await until_signal()
        self.on_status(
            f"draining: finishing sessions in flight (up to {c.shutdown_grace:.0f}s); signal again to quit now"
        )
        for task in tasks:
            task.cancel()
        # Leaving stays bounded when the DHT is gone: `draining` is announced while sessions in flight
        # finish (server.stop returns at once when none are), then waited for at most LEAVE_STEP_SECONDS;
        # the DHT gets as long to stop before it is killed. A node with nothing in flight leaves in ~2 s.
        draining = asyncio.ensure_future(self.announcer.announce("draining")) if self.announcer else None
        await server.stop(c.shutdown_grace)
        if draining is not None:
            await bounded(draining, "announcing draining", LEAVE_STEP_SECONDS)
        self.backend.shutdown()
        if self.dht is not None:
            self.dht.shutdown_timeout = LEAVE_STEP_SECONDS  # hivemind's join before it terminates the process
            await bounded(asyncio.to_thread(self.dht.shutdown), "stopping the DHT", LEAVE_STEP_SECONDS + 0.5)
            if self.dht.is_alive():
                self.dht.kill()
        self.on_status("stopped")

    async def reach_and_relay(self) -> list[asyncio.Task]:
        """Serves through a relay when this node cannot be dialled (node/reachability.py), and relays for
        others with --relay; returns the tasks that keep both going."""
        c, swarm, tasks = self.config, self.config.swarm, []
        local = f"{'127.0.0.1' if c.host in ('0.0.0.0', '::') else c.host}:{self.port}"

        async def moved(registration) -> None:
            self.relayed = registration
            self.on_status(f"relayed: reachable through relay {registration.relay.peer_id} at {registration.address}")
            await self.announcer.announce()

        key = b"" if c.insecure else self.identity.public_key
        announced = f"{swarm.announce_host or c.host}:{self.port}"
        link = await establish(swarm.reachable, self.dht, self.identity, announced, local, key, moved, self.on_status)
        if link is not None:
            self.relayed = link.current
            tasks.append(asyncio.create_task(link.run_forever()))
        if swarm.relay is not None:
            relay = serve_relay(
                self.dht, self.identity, c.host, swarm.relay_port, swarm.announce_host, swarm.relay, self.on_status
            )
            tasks.append(asyncio.create_task(relay))
        return tasks

    def listen(self, server: aio.Server) -> int:
        """Binds the gRPC port: TLS with the certificate bound to this node's identity, unless --insecure."""
        c = self.config
        if self.certificate is None:
            return server.add_insecure_port(f"{c.host}:{c.port}")
        return server.add_secure_port(f"{c.host}:{c.port}", self.certificate.server_credentials())

    async def track_throughput(self) -> None:
        """Keeps the tokens/s that Info and the DHT record announce current from the steps actually served
        (at batch 1, or at the node's usual batch while busy), so routing follows reality."""
        while True:
            await asyncio.sleep(THROUGHPUT_REFRESH_SECONDS)
            self.backend.refresh_throughput()

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
        self.backend = await torch_threads.in_passing_thread(self.load_backend, start, start + n)
        self.servicer.backend = self.backend  # new streams use the new span; open ones keep the old one
        await self.announcer.announce("online")
        self.on_status(f"ready: serving blocks {start}:{start + n} of {self.ckpt.name} on port {self.port}")
        asyncio.create_task(_retire(old))


async def _retire(backend: SpanBackend) -> None:
    """Frees an old span's compute thread once its last session has closed."""
    # a poll, not an Event: sessions end in the runner thread and by idle expiry, and a retired span is rare
    while backend.sessions:  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    await asyncio.to_thread(backend.shutdown)


async def serve(config: NodeConfig, on_status: Callable[[str], None] = log.info) -> None:
    await Node(config, on_status).run()
