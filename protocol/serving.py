"""Running a long-lived process: bind a port, serve until a signal, shut down within a bound.

Every server the CLI starts (node, API, coordinator, dashboard) uses these, so they all behave alike:
a busy port fails before anything slow is loaded, the first SIGINT/SIGTERM starts a graceful stop, a
second one quits at once, and no shutdown step can hang the process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_STEP_SECONDS = 10.0  # the longest any one shutdown step may take


def bind_tcp(host: str, port: int, what: str = "server") -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one). OSError names `what` and the address."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise ValueError(f"{what}: listen address {host!r} is not an IP address") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(f"{what} cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, path: str = "/") -> str:
    """http://host:port/path of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


async def until_signal() -> None:
    """Returns on the first SIGINT/SIGTERM; from then on, another one exits the process at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, os._exit, 1)


async def bounded(step: Awaitable, what: str, seconds: float = DEFAULT_STEP_SECONDS) -> None:
    """Awaits one shutdown step for at most `seconds`; failure is logged, never raised: leaving goes on."""
    try:
        await asyncio.wait_for(step, seconds)
    except Exception as e:  # TimeoutError included
        log.warning("%s failed or took over %.0fs: %r", what, seconds, e)


async def serve_http(
    app,
    sock: socket.socket,
    stop: Awaitable[None],
    on_ready: Callable[[], None] | None = None,
    grace: float = DEFAULT_STEP_SECONDS,
) -> None:
    """Serves an ASGI app with uvicorn on `sock` until `stop` completes, then closes within `grace` s.

    Signals stay with the caller: uvicorn's lifecycle methods are driven here instead of `serve()`,
    which would install its own SIGINT/SIGTERM handlers over the caller's.
    """
    import uvicorn  # the `api` extra: only HTTP servers need it

    # uvicorn annotates timeout_graceful_shutdown as int and uses it as a float timeout
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=grace,  # type: ignore[arg-type]  # see above: a float works
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    main = asyncio.create_task(server.main_loop())  # ticks the Date header; returns once should_exit
    waiter = asyncio.ensure_future(stop)
    try:
        if on_ready is not None:
            on_ready()
        await asyncio.wait([main, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        waiter.cancel()
        await bounded(main, "stopping the HTTP loop", grace)
        await bounded(server.shutdown(sockets=[sock]), "closing HTTP connections", grace + 1)
    failure = main.exception() if main.done() and not main.cancelled() else None
    if failure is not None:
        raise failure
