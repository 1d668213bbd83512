"""A node behind a NAT keeps one outbound connection to a relay; clients reach it through the relay.

The relay (node/relay.py) gives each registered node a port of its own. A client (or a pushing node)
dials that port exactly as it would dial the node: the relay asks the node, over its control
connection, to open a fresh outbound connection for the new stream, and then splices the two TCP
connections byte for byte. So the gRPC stream - its TLS, bound to the node's identity (protocol/wire/tls.py),
and every signed message in it - runs end to end between client and node: a relay can delay or drop
bytes, never read, forge or alter them unnoticed. Clients need no relay-specific code at all.

Wire format of the relay's control port: one JSON object per line.
    relay -> any:     {"relay": peer id, "challenge": hex}                  (greeting)
    node  -> relay:   {"op": "register", "public_key": hex, "signature": hex(sign(REGISTER + challenge))}
    relay -> node:    {"ok": true, "address": "host:port"} | {"error": "..."}
    relay -> node:    {"op": "connect", "token": hex}                       (a client dialled the node's port)
    node  -> relay:   {"op": "ping"}  ->  {"op": "pong"}                    (heartbeat)
    node  -> relay:   on a new connection {"op": "accept", "token": hex}, then raw bytes both ways
    any   -> relay:   {"op": "dialback", "host": h, "port": p, "public_key": hex | ""}
                      -> {"reachable": bool, "reason": str}

`RelayLink` is the node's end: pick a relay from the DHT's relay directory, register, bridge every
stream to the local gRPC server, and when the relay dies pick another and re-announce.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import hivemind

from ..dht.relay_directory import RelayEntry, find_relays
from .identity import Identity
from .tls import split_address

log = logging.getLogger(__name__)

REGISTER_CONTEXT = b"torchnode relay register v1\0"
MAX_LINE_BYTES = 64 << 10  # also the stream buffer: a line longer than this is refused
CHUNK_BYTES = 64 << 10
DEFAULT_HEARTBEAT = 5.0  # seconds between pings; a relay silent for 3 of them is dead
CONNECT_TIMEOUT = 5.0
FAILED_RELAY_S = 60.0  # a relay that died or refused is not picked again for this long


class RelayError(Exception):
    """A relay refused, broke the protocol, or could not be reached."""


async def read_message(reader: asyncio.StreamReader, timeout: float | None) -> dict:
    """One JSON line; RelayError on EOF, a line too long, or anything but a JSON object."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (ValueError, asyncio.LimitOverrunError):
        raise RelayError(f"control line longer than {MAX_LINE_BYTES} bytes") from None
    except TimeoutError:
        raise RelayError(f"no message within {timeout}s") from None
    if not line:
        raise RelayError("connection closed")
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise RelayError("control line is not JSON") from None
    if not isinstance(message, dict):
        raise RelayError("control message is not a JSON object")
    return message


def write_message(writer: asyncio.StreamWriter, message: dict) -> None:
    writer.write(json.dumps(message).encode() + b"\n")


async def open_connection(address: str, timeout: float = CONNECT_TIMEOUT):
    host, port = split_address(address)
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_LINE_BYTES), timeout)
    except (OSError, TimeoutError) as e:
        raise RelayError(f"cannot connect to relay {address}: {e!r}") from None


Through = Callable[[bytes], Awaitable[bytes]]  # what a relay does to each chunk on its way (rate limits it)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, through: Through | None = None) -> None:
    """Copies bytes until EOF, then half-closes `writer`; each chunk passes `through` first."""
    try:
        while data := await reader.read(CHUNK_BYTES):
            if through is not None:
                data = await through(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def splice(a: tuple, b: tuple, through: Through | None = None) -> None:
    """Both directions between two (reader, writer) pairs until both end; closes both."""
    try:
        await asyncio.gather(pipe(a[0], b[1], through), pipe(b[0], a[1], through))
    finally:
        for _, writer in (a, b):
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def dialback(
    relay: RelayEntry, host: str, port: int, public_key: bytes, timeout: float = 10.0
) -> tuple[bool, str]:
    """Asks `relay` to dial host:port back (AutoNAT-style); (reachable, reason)."""
    reader, writer = await open_connection(relay.address)
    try:
        await read_message(reader, timeout)  # greeting
        write_message(writer, {"op": "dialback", "host": host, "port": port, "public_key": public_key.hex()})
        answer = await read_message(reader, timeout)
    finally:
        writer.close()
    if not isinstance(answer.get("reachable"), bool):
        raise RelayError(f"relay {relay.peer_id}: malformed dial-back answer {answer!r}")
    return answer["reachable"], str(answer.get("reason", ""))[:300]


@dataclass
class Registration:
    relay: RelayEntry
    address: str  # where clients dial the node through the relay
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class RelayLink:
    """The relayed node's end. `local`: the node's own gRPC address (host:port) that streams bridge to;
    `on_change(registration)` runs after each move to a new relay (re-announce there)."""

    def __init__(
        self,
        dht: hivemind.DHT,
        identity: Identity,
        local: str,
        on_change: Callable[[Registration], Awaitable[None]],
        on_status: Callable[[str], None] = log.info,
        heartbeat: float = DEFAULT_HEARTBEAT,
    ):
        self.dht, self.identity, self.local, self.on_change, self.on_status = dht, identity, local, on_change, on_status
        self.heartbeat = heartbeat
        self.failed: dict[str, float] = {}  # relay peer id -> until when it is not picked
        self.current: Registration | None = None
        self.bridges: set[asyncio.Task] = set()

    async def candidates(self) -> list[RelayEntry]:
        """Relays in the DHT that have room, are not this node and did not just fail it; least loaded first."""
        now = time.monotonic()
        relays = await find_relays(self.dht, return_future=True)
        fresh = [
            r
            for r in relays
            if r.peer_id != self.identity.peer_id and self.failed.get(r.peer_id, 0) < now and r.free > 0
        ]
        random.shuffle(fresh)  # equally loaded relays share the nodes
        return sorted(fresh, key=lambda r: r.nodes / max(r.max_nodes, 1))

    async def register(self) -> Registration:
        """Registers with the first relay that accepts; RelayError when none does."""
        errors = []
        for relay in await self.candidates():
            try:
                registration = await self._register(relay)
            except RelayError as e:
                self.failed[relay.peer_id] = time.monotonic() + FAILED_RELAY_S
                errors.append(f"{relay.peer_id[:12]} at {relay.address}: {e}")
                continue
            self.current = registration
            return registration
        raise RelayError("no relay accepted this node" + (f" ({'; '.join(errors)})" if errors else ": none in the DHT"))

    async def _register(self, relay: RelayEntry) -> Registration:
        reader, writer = await open_connection(relay.address)
        try:
            greeting = await read_message(reader, CONNECT_TIMEOUT)
            if greeting.get("relay") != relay.peer_id:
                raise RelayError(f"relay at {relay.address} is not peer {relay.peer_id}")
            challenge = bytes.fromhex(str(greeting.get("challenge", "")))
            signature = self.identity.sign(REGISTER_CONTEXT + challenge)
            write_message(
                writer, {"op": "register", "public_key": self.identity.public_key.hex(), "signature": signature.hex()}
            )
            answer = await read_message(reader, CONNECT_TIMEOUT)
        except (RelayError, ValueError) as e:
            writer.close()
            raise RelayError(str(e)) from None
        if not answer.get("ok") or not isinstance(answer.get("address"), str):
            writer.close()
            raise RelayError(f"refused: {answer.get('error', answer)}")
        return Registration(relay, answer["address"], reader, writer)

    async def serve(self, registration: Registration) -> None:
        """Bridges streams through `registration` until the relay goes silent or closes the connection."""
        reader, writer = registration.reader, registration.writer

        async def ping() -> None:
            while True:
                await asyncio.sleep(self.heartbeat)
                write_message(writer, {"op": "ping"})
                await writer.drain()

        pinger = asyncio.create_task(ping())
        try:
            while True:
                message = await read_message(reader, 3 * self.heartbeat)
                if message.get("op") == "connect" and isinstance(message.get("token"), str):
                    task = asyncio.create_task(self.bridge(registration.relay, message["token"]))
                    self.bridges.add(task)
                    task.add_done_callback(self.bridges.discard)
        except (RelayError, ConnectionError, OSError) as e:
            log.warning("relay %s lost: %s", registration.relay.peer_id, e)
        finally:
            pinger.cancel()
            writer.close()

    async def bridge(self, relay: RelayEntry, token: str) -> None:
        """One client stream: a new connection to the relay, spliced to the node's own gRPC port."""
        try:
            upstream = await open_connection(relay.address)
            await read_message(upstream[0], CONNECT_TIMEOUT)
            write_message(upstream[1], {"op": "accept", "token": token})
            host, port = split_address(self.local)
            local = await asyncio.open_connection(host, port)
        except (RelayError, OSError) as e:
            log.warning("could not bridge a stream from relay %s: %s", relay.peer_id, e)
            return
        await splice(upstream, local)

    async def run_forever(self) -> None:
        """Serves through the current relay; when it dies, picks another (backing off while none accepts)."""
        registration = self.current or await self.register()
        while True:
            await self.serve(registration)
            self.failed[registration.relay.peer_id] = time.monotonic() + FAILED_RELAY_S
            self.on_status(f"relay {registration.relay.peer_id} lost; picking another")
            delay = 0.5
            while True:
                try:
                    registration = await self.register()
                    break
                except RelayError as e:
                    log.warning("%s; retrying in %.1fs", e, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
            await self.on_change(registration)
