"""The relay: lets nodes that cannot be dialled (behind a home router) serve through this reachable peer.

`torchnode coordinator --relay` and `torchnode join --relay` run one. It listens on a control port,
announces itself in the DHT's relay directory (protocol/dht/relay_directory.py), and for each registered node
opens a port of its own: a client dialling that port gets a stream spliced, byte for byte, to a fresh
outbound connection from the node (protocol/wire/relay_link.py describes the wire). TLS and signatures run
end to end, so the relay sees only ciphertext and can delay or drop it, never alter it unnoticed.

It also answers AutoNAT-style dial-backs (node/reachability.py): it dials the asking peer's port at the
address the request came FROM (never a third party's), and, given a key, checks that the TLS
certificate there is bound to it.

Limits, each a flag: nodes relayed at once, streams at once, and bytes per second per relayed node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hivemind
from aiolimiter import AsyncLimiter
from hivemind.utils.timed_storage import get_dht_time

from ..protocol.dht.relay_directory import RelayEntry, announce_relay
from ..protocol.wire import tls
from ..protocol.wire.identity import PUBLIC_KEY_BYTES, Identity, peer_id_of, verify
from ..protocol.wire.relay_link import (
    CHUNK_BYTES,
    MAX_LINE_BYTES,
    REGISTER_CONTEXT,
    RelayError,
    Through,
    read_message,
    splice,
    write_message,
)
from .limits import RelayLimits

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0  # seconds a new connection has to say what it wants
ACCEPT_TIMEOUT = 10.0  # seconds a node has to open the connection for a client's stream
DIALBACK_TIMEOUT = 5.0
DEFAULT_EXPIRATION = 30.0
NODE_SILENCE_S = 20.0  # a relayed node that sends no heartbeat for this long is dropped


@dataclass
class Relayed:
    """One registered node: its control connection, its own listening port, its streams and rate."""

    peer_id: str
    control: asyncio.StreamWriter
    server: asyncio.base_events.Server | None = None
    address: str = ""
    streams: set[asyncio.Task] = field(default_factory=set)
    limiter: AsyncLimiter | None = None


class RelayServer:
    def __init__(
        self, identity: Identity, host: str, port: int, announce_host: str | None, limits: RelayLimits | None = None
    ):
        self.identity, self.host, self.port, self.limits = identity, host, port, limits or RelayLimits()
        self.announce_host = announce_host or host
        self.nodes: dict[str, Relayed] = {}
        self.pending: dict[str, asyncio.Future] = {}
        self.streams = 0
        self.server: asyncio.base_events.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.announce_host}:{self.port}"

    async def start(self) -> None:
        try:
            self.server = await asyncio.start_server(self.handle, self.host, self.port, limit=MAX_LINE_BYTES)
        except OSError as e:
            raise OSError(f"relay cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for node in list(self.nodes.values()):
            self._drop(node)
        if self.server is not None:
            self.server.close()

    def entry(self, expiration: float) -> RelayEntry:
        return RelayEntry(
            peer_id=self.identity.peer_id,
            public_key=self.identity.public_key,
            address=self.address,
            nodes=len(self.nodes),
            max_nodes=self.limits.max_nodes,
            expiration=expiration,
        )

    async def announce_forever(self, dht: hivemind.DHT, expiration: float = DEFAULT_EXPIRATION) -> None:
        """Keeps this relay's directory entry fresh (every third of `expiration`)."""
        while True:
            try:
                await announce_relay(dht, self.identity, self.entry(get_dht_time() + expiration), return_future=True)
            except Exception as e:  # best effort, as every DHT store: retried next period
                log.warning("announcing the relay failed: %s", e)
            await asyncio.sleep(expiration / 3)

    # ---- the control port
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        challenge = secrets.token_bytes(16)
        try:
            write_message(writer, {"relay": self.identity.peer_id, "challenge": challenge.hex()})
            message = await read_message(reader, HELLO_TIMEOUT)
            op = message.get("op")
            if op == "register":
                await self.register(message, challenge, reader, writer)
            elif op == "accept":
                await self.accept(message, reader, writer)
                return  # the stream's splice owns the connection now
            elif op == "dialback":
                write_message(writer, await self.dialback(message, writer.get_extra_info("peername")[0]))
                await writer.drain()
            else:
                write_message(writer, {"error": f"unknown op {op!r}: expected register, accept or dialback"})
        except (RelayError, ConnectionError, OSError) as e:
            log.debug("relay control connection ended: %s", e)
        writer.close()

    async def register(self, message: dict, challenge: bytes, reader, writer) -> None:
        try:
            public_key = bytes.fromhex(str(message.get("public_key", "")))
            signature = bytes.fromhex(str(message.get("signature", "")))
        except ValueError:
            public_key = signature = b""
        if len(public_key) != PUBLIC_KEY_BYTES or not verify(public_key, signature, REGISTER_CONTEXT + challenge):
            write_message(writer, {"error": "register: bad public key or signature over the challenge"})
            return
        peer_id = peer_id_of(public_key)
        if peer_id in self.nodes:  # the node came back (its old connection died unnoticed): replace it
            self._drop(self.nodes[peer_id])
        if len(self.nodes) >= self.limits.max_nodes:
            write_message(writer, {"error": f"relay full: {self.limits.max_nodes} nodes (--relay-max-nodes)"})
            return
        node = Relayed(peer_id, writer, limiter=AsyncLimiter(self.limits.bytes_per_second, 1.0))
        node.server = await asyncio.start_server(
            lambda r, w: self.client(node, r, w), self.host, 0, limit=MAX_LINE_BYTES
        )
        node.address = f"{self.announce_host}:{node.server.sockets[0].getsockname()[1]}"
        self.nodes[peer_id] = node
        log.info("relaying node %s at %s", peer_id, node.address)
        try:
            write_message(writer, {"ok": True, "address": node.address})
            while True:  # heartbeats until the node goes away or falls silent
                if (await read_message(reader, NODE_SILENCE_S)).get("op") == "ping":
                    write_message(writer, {"op": "pong"})
        finally:
            if self.nodes.get(peer_id) is node:
                self._drop(node)

    def _drop(self, node: Relayed) -> None:
        self.nodes.pop(node.peer_id, None)
        if node.server is not None:
            node.server.close()
        for task in list(node.streams):
            task.cancel()
        node.control.close()

    async def accept(self, message: dict, reader, writer) -> None:
        future = self.pending.pop(str(message.get("token", "")), None)
        if future is None or future.done():
            write_message(writer, {"error": "unknown or expired stream token"})
            writer.close()
            return
        future.set_result((reader, writer))

    async def dialback(self, message: dict, observed_host: str) -> dict:
        """Dials the asker's `port` at the address its request came from; says whether that reached it."""
        host, port, key = message.get("host"), message.get("port"), str(message.get("public_key", ""))
        if not isinstance(port, int) or not 0 < port < 65536:
            return {"reachable": False, "reason": f"dialback: bad port {port!r}"}
        if host != observed_host:
            return {"reachable": False, "reason": f"announces {host} but connects from {observed_host} (behind a NAT)"}
        address = f"{observed_host}:{port}"
        try:
            if key:
                await tls.pin(address, bytes.fromhex(key), DIALBACK_TIMEOUT)  # the node itself, not whoever is there
            else:  # a plaintext (--insecure) node: a TCP connection is all there is to check
                _, w = await asyncio.wait_for(asyncio.open_connection(observed_host, port), DIALBACK_TIMEOUT)
                w.close()
        except (OSError, TimeoutError, ValueError, tls.BindingError) as e:
            return {"reachable": False, "reason": f"dialling {address} failed: {e!r}"}
        return {"reachable": True, "reason": f"dialled {address}"}

    # ---- a client's stream to a relayed node
    async def client(self, node: Relayed, reader, writer) -> None:
        if self.streams >= self.limits.max_streams:
            log.warning(
                "relay at its stream limit (%d, --relay-max-streams): refusing a stream", self.limits.max_streams
            )
            writer.close()
            return
        token = secrets.token_hex(16)
        future = asyncio.get_running_loop().create_future()
        self.pending[token] = future
        self.streams += 1
        task = asyncio.current_task()
        node.streams.add(task)
        try:
            write_message(node.control, {"op": "connect", "token": token})
            await node.control.drain()
            upstream = await asyncio.wait_for(future, ACCEPT_TIMEOUT)
            await splice((reader, writer), upstream, self.throttle(node))
        except (TimeoutError, ConnectionError, OSError) as e:
            log.debug("stream to %s failed: %r", node.peer_id, e)
        finally:
            self.pending.pop(token, None)
            self.streams -= 1
            node.streams.discard(task)
            writer.close()

    def throttle(self, node: Relayed) -> Through:
        """What each chunk of `node`'s streams passes: the node's bytes-per-second budget, nothing else."""
        step = min(CHUNK_BYTES, self.limits.bytes_per_second)  # AsyncLimiter refuses amounts above its rate

        async def take(data: bytes) -> bytes:
            for start in range(0, len(data), step):
                await node.limiter.acquire(min(step, len(data) - start))
            return data

        return take


async def serve_relay(
    dht: hivemind.DHT,
    identity: Identity,
    host: str,
    port: int,
    announce_host: str | None,
    limits: RelayLimits,
    on_status: Callable[[str], None],
) -> None:
    """Runs a relay until cancelled: listens, announces itself in the DHT, and closes on the way out."""
    relay = RelayServer(identity, host, port, announce_host, limits)
    await relay.start()
    on_status(f"relay ready at {relay.address} as peer {identity.peer_id} (up to {limits.max_nodes} nodes)")
    try:
        await relay.announce_forever(dht)
    finally:
        with contextlib.suppress(Exception):
            await relay.close()


@dataclass(frozen=True)
class RelaySetup:
    """What `coordinator --relay` needs to run a relay beside its DHT peer: a key, a port, the limits."""

    identity_path: Path
    port: int = 0
    limits: RelayLimits = RelayLimits()

    async def run(
        self, dht: hivemind.DHT, host: str, announce_host: str | None, on_status: Callable[[str], None]
    ) -> None:
        await serve_relay(
            dht, Identity.load_or_create(self.identity_path), host, self.port, announce_host, self.limits, on_status
        )
