"""Starting and stopping a node: load the span, measure it, serve signed gRPC until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from grpc import aio

from ..models.checkpoint import resolve
from ..models.families import load_span, num_blocks
from ..protocol import torchnode_pb2_grpc as pb_grpc
from ..protocol.identity import Identity
from ..protocol.signing import ReplayGuard
from .auth_interceptor import AuthInterceptor
from .limits import Limits
from .servicer import NodeServicer
from .span_backend import SpanBackend, SpanInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    model: str
    start: int
    end: int | None  # None: to the last block
    host: str = "127.0.0.1"
    port: int = 31330
    dtype: torch.dtype = torch.float32
    identity_path: Path | None = None
    limits: Limits = field(default_factory=Limits)
    shutdown_grace: float = 10.0  # seconds in-flight steps get to finish on SIGTERM


def grpc_options(limits: Limits) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
    ]


async def serve(config: NodeConfig, on_status: Callable[[str], None] = log.info) -> None:
    identity = Identity.load_or_create(config.identity_path)
    ckpt = resolve(config.model, on_status)
    total = num_blocks(ckpt)
    end = total if config.end is None else config.end
    on_status(f"loading blocks {config.start}:{end} of {ckpt.name} ({total} blocks) as {config.dtype}")
    span = load_span(ckpt, config.start, end, config.dtype)
    info = SpanInfo(ckpt.name, ckpt.revision, config.start, end, total, span.config.hidden_size, config.dtype)
    backend = SpanBackend(span, info, config.limits)
    on_status(f"measured {backend.measure_throughput():.1f} tokens/s over the span")

    server = aio.server(
        interceptors=[AuthInterceptor(identity, ReplayGuard(config.limits.max_clock_skew))],
        options=grpc_options(config.limits),
    )
    pb_grpc.add_NodeServicer_to_server(NodeServicer(backend, identity.public_key), server)
    address = f"{config.host}:{config.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address} (port in use?)")
    await server.start()
    on_status(
        f"ready: serving blocks {config.start}:{end} of {ckpt.name} on {config.host}:{port} "
        f"as peer {identity.peer_id}"
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    on_status(f"stopping: finishing steps in flight (up to {config.shutdown_grace:.0f}s)")
    await server.stop(config.shutdown_grace)
    backend.shutdown()
    on_status("stopped")
