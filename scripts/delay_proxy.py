"""A TCP proxy that delays every chunk by D ms in each direction: distance on a kernel without sch_netem.

Each chunk read from one side is written to the other D ms after it arrived, in order, so a request and
its reply each take D ms longer (2 D per round trip) while bandwidth stays what loopback gives.

    .venv/bin/python scripts/delay_proxy.py --delay-ms 25 --map 127.0.0.1:41000=127.0.0.1:31330 [--map ...]

Prints one `ready: LISTEN -> TARGET` line per mapping, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

CHUNK = 1 << 16


def _delayed_pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Copies src to dst, each chunk `delay` seconds after it was read, in order (None marks the end).

    Threads and time.sleep rather than asyncio: an asyncio timer fires up to a millisecond late (its
    waits are whole milliseconds), which made a 50 ms round trip take 51.8 ms."""
    chunks: queue.SimpleQueue[tuple[float, bytes | None]] = queue.SimpleQueue()

    def deliver() -> None:
        while True:
            due, data = chunks.get()
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            try:
                if data is None:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    writer = threading.Thread(target=deliver, daemon=True)
    writer.start()
    with contextlib.suppress(OSError):
        while data := src.recv(CHUNK):
            chunks.put((time.monotonic() + delay, data))
    chunks.put((time.monotonic() + delay, None))
    writer.join()


def _serve_connection(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    try:
        node = socket.create_connection(target)
    except OSError:
        client.close()
        return
    for sock in (client, node):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_delayed_pipe, args=(node, client, delay), daemon=True)
    back.start()
    _delayed_pipe(client, node, delay)
    back.join()
    client.close()
    node.close()


def spawn(maps: list[tuple[str, str]], delay_ms: float) -> subprocess.Popen:
    """This proxy in a process of its own (for benchmarks), with LISTEN=TARGET `maps` ("host:port" each);
    returns once it listens on all of them."""
    args = [arg for listen, target in maps for arg in ("--map", f"{listen}={target}")]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--delay-ms", str(delay_ms), *args], stdout=subprocess.PIPE, text=True
    )
    for _ in maps:
        line = proc.stdout.readline()
        if not line.startswith("ready:"):
            proc.kill()
            raise RuntimeError(f"delay proxy failed to start: {line!r}")
    return proc


def _address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def serve(mappings: list[tuple[tuple[str, int], tuple[str, int]]], delay_ms: float) -> None:
    """Listens on each LISTEN address and relays to its TARGET with the delay, until SIGINT/SIGTERM."""
    delay, stop = delay_ms / 1000, threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before "ready": a caller may stop it as soon as it reads that
        signal.signal(sig, lambda *_: stop.set())
    for listen, target in mappings:
        server = socket.create_server(listen)
        threading.Thread(target=_accept, args=(server, target, delay), daemon=True).start()
        print(f"ready: {listen[0]}:{listen[1]} -> {target[0]}:{target[1]} (+{delay_ms:g} ms each way)", flush=True)
    while not stop.wait(1.0):  # the main thread must wake now and then for Python to run the signal handler
        pass


def _accept(server: socket.socket, target: tuple[str, int], delay: float) -> None:
    while True:
        client, _ = server.accept()
        threading.Thread(target=_serve_connection, args=(client, target, delay), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="delay added to every chunk, each way (25)")
    parser.add_argument("--map", action="append", required=True, help="LISTEN_HOST:PORT=TARGET_HOST:PORT (repeatable)")
    args = parser.parse_args()
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    try:
        mappings = [(_address(a), _address(b)) for a, b in (m.split("=", 1) for m in args.map)]
    except ValueError:
        parser.error("--map takes LISTEN_HOST:PORT=TARGET_HOST:PORT")
    serve(mappings, args.delay_ms)


if __name__ == "__main__":
    main()
