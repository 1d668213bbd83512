"""A TCP proxy that delays every chunk by D ms in each direction: distance on a kernel without sch_netem.

Each chunk read from one side is written to the other D ms after it arrived, in order, so a request and
its reply each take D ms longer (2 D per round trip) while bandwidth stays what loopback gives.

    .venv/bin/python scripts/delay_proxy.py --delay-ms 25 --map 127.0.0.1:41000=127.0.0.1:31330 [--map ...]

Prints one `ready: LISTEN -> TARGET` line per mapping, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys

CHUNK = 1 << 16


async def _delayed_pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copies reader to writer, each chunk `delay` seconds after it was read (None marks the end)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if data is None:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            queue.put_nowait((loop.time() + delay, data))
    except OSError:
        pass
    queue.put_nowait((loop.time() + delay, None))
    with contextlib.suppress(OSError):
        await delivering


async def _serve_connection(client_r, client_w, target: tuple[str, int], delay: float) -> None:
    try:
        node_r, node_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(_delayed_pipe(client_r, node_w, delay), _delayed_pipe(node_r, client_w, delay))
    except asyncio.CancelledError:
        pass  # the proxy is shutting down: connections end with it
    finally:
        for w in (client_w, node_w):
            w.close()


def spawn(maps: list[tuple[str, str]], delay_ms: float) -> subprocess.Popen:
    """This proxy in a process of its own (for benchmarks), with LISTEN=TARGET `maps` ("host:port" each);
    returns once it listens on all of them."""
    args = [arg for listen, target in maps for arg in ("--map", f"{listen}={target}")]
    proc = subprocess.Popen([sys.executable, __file__, "--delay-ms", str(delay_ms), *args], stdout=subprocess.PIPE, text=True)
    for _ in maps:
        line = proc.stdout.readline()
        if not line.startswith("ready:"):
            proc.kill()
            raise RuntimeError(f"delay proxy failed to start: {line!r}")
    return proc


def _address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


async def serve(mappings: list[tuple[tuple[str, int], tuple[str, int]]], delay_ms: float) -> None:
    """Listens on each LISTEN address and relays to its TARGET with the delay, until SIGINT/SIGTERM."""
    delay = delay_ms / 1000
    servers = []
    for listen, target in mappings:
        handler = lambda r, w, target=target: _serve_connection(r, w, target, delay)  # noqa: E731
        servers.append(await asyncio.start_server(handler, *listen))
        print(f"ready: {listen[0]}:{listen[1]} -> {target[0]}:{target[1]} (+{delay_ms:g} ms each way)", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


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
    asyncio.run(serve(mappings, args.delay_ms))


if __name__ == "__main__":
    main()
