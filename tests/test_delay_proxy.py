"""scripts/delay_proxy.py, the distance that scripts/bench_wan.py and bench_relay.py measure through: every
byte arrives, in order, no sooner than the delay; an end of stream is passed on; SIGTERM stops it."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from delay_proxy import spawn  # noqa: E402
from swarm import free_port  # noqa: E402

pytestmark = pytest.mark.swarm  # starts the proxy's process

DELAY_MS = 30


@pytest.fixture
def echo() -> str:
    """A TCP echo server on loopback; it closes a connection once the client has closed its side."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.fixture
def proxied(echo: str):
    listen = f"127.0.0.1:{free_port()}"
    proc = spawn([(listen, echo)], DELAY_MS)
    yield listen, proc
    proc.terminate()
    proc.wait(10)


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := conn.recv(1 << 16)):
        data += chunk
    return data


def test_a_round_trip_takes_twice_the_delay_and_every_byte_arrives_in_order(proxied):
    listen, _ = proxied
    with _connect(listen) as conn:
        for _ in range(3):
            started = time.monotonic()
            conn.sendall(b"x" * 1200)
            assert _read(conn, 1200) == b"x" * 1200
            assert time.monotonic() - started >= 2 * DELAY_MS / 1000
        payload = bytes(range(256)) * 8192  # 2 MiB: many chunks, each delayed, none reordered
        threading.Thread(target=conn.sendall, args=(payload,), daemon=True).start()
        assert _read(conn, len(payload)) == payload
        conn.shutdown(socket.SHUT_WR)  # the end of stream goes through: the echo server closes, so do we
        assert conn.recv(1) == b""


def test_sigterm_stops_the_proxy(proxied):
    listen, proc = proxied
    with _connect(listen):
        proc.terminate()
        assert proc.wait(10) == 0
