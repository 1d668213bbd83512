"""A TCP proxy for tests, on 127.0.0.1: it relays to a node and records every byte it sees.

Given a certificate of its own it plays man in the middle: it ends the client's TLS with that
certificate, opens its own TLS to the node, and records the plaintext in between. `honest` connections
first are relayed untouched, as a man in the middle would when he steps in after the client's checks.
The proxy runs its own event loop in a thread, so synchronous and asyncio tests can both use it.
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import threading
from pathlib import Path

from torchnode.protocol.wire.tls import NodeCertificate, split_address


class TcpProxy:
    def __init__(self, target: str, certificate: NodeCertificate | None = None, honest: int = 0):
        self.target = split_address(target)
        self.certificate, self.honest = certificate, honest
        self.chunks: list[bytes] = []  # both directions, in arrival order
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def captured(self) -> bytes:
        return b"".join(self.chunks)

    def __enter__(self) -> TcpProxy:
        ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(ready),), daemon=True)
        self.thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)
        self.loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self.stop, tasks = asyncio.Event(), set()

        async def handle(reader, writer):
            tasks.add(asyncio.current_task())
            await self._handle(reader, writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self.stop.wait()
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        intercept = self.certificate is not None and self.connections > self.honest
        try:
            if intercept:
                await writer.start_tls(self._server_context())
                up_reader, up_writer = await asyncio.open_connection(*self.target, ssl=_client_context())
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, ssl.SSLError):
            pass  # a refused handshake is what the tests expect of clients
        finally:
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                self.chunks.append(data)
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def _server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as tmp:
            pem = Path(tmp) / "mitm.pem"
            pem.write_bytes(self.certificate.key_pem + self.certificate.cert_pem)
            context.load_cert_chain(pem)
        context.set_alpn_protocols(["h2"])
        return context


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    return context
