"""Runs the health monitor and the dashboard's HTTP server: on its own DHT peer (`run_dashboard`), or
inside a coordinator next to its bootstrap peer (`serve_dashboard`, called by `run_bootstrap`).

uvicorn serves the app on a socket bound here (so a busy port is an OSError at start, and port 0 picks a
free one that the status line reports); signals belong to the caller, not to uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import hivemind
import uvicorn

from ..protocol.dht_network import start_dht
from .bootstrap import until_signal
from .dashboard_app import create_app
from .health_monitor import DEFAULT_MODEL_NAME, DEFAULT_PROBE_TIMEOUT, DEFAULT_REFRESH, HealthMonitor, model_name

DEFAULT_HTTP_PORT = 8080


@dataclass(frozen=True)
class DashboardConfig:
    models: tuple[str, ...] = (DEFAULT_MODEL_NAME,)  # swarm model names; "default" = the embedded model
    host: str = "127.0.0.1"  # HTTP listen address; 0.0.0.0 shows the dashboard to everyone
    http_port: int = DEFAULT_HTTP_PORT  # 0 picks a free port
    refresh: float = DEFAULT_REFRESH  # seconds between scans
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT

    def __post_init__(self):
        if not self.models:
            raise ValueError("watch at least one model (--model)")
        object.__setattr__(self, "models", tuple(dict.fromkeys(model_name(m) for m in self.models)))
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"--http-port {self.http_port} is not a TCP port")
        if not self.refresh > 0 or not self.probe_timeout > 0:
            raise ValueError("--refresh and the probe timeout must be positive")
        ipaddress.ip_address(self.host)  # ValueError: the HTTP host must be an IP address


async def run_dashboard(
    initial_peers: list[str],
    models: list[str],
    host: str = "127.0.0.1",
    http_port: int = DEFAULT_HTTP_PORT,
    refresh: float = DEFAULT_REFRESH,
    on_status: Callable[[str], None] = print,
) -> None:
    """A standalone dashboard: joins the swarm as a DHT client, serves until SIGINT/SIGTERM."""
    if not initial_peers:
        raise ValueError("give the multiaddr of any swarm peer (--initial-peers)")
    config = DashboardConfig(tuple(models) or (DEFAULT_MODEL_NAME,), host, http_port, refresh)
    sock = bind_http(host, http_port)  # before the DHT: a busy port fails fast
    try:
        dht = await asyncio.to_thread(start_dht, list(initial_peers), client_mode=True)
    except BaseException:
        sock.close()
        raise
    try:
        await serve_dashboard(dht, config, on_status, until_signal(), sock=sock)
    finally:
        await asyncio.to_thread(dht.shutdown)
        on_status("stopped")


async def serve_dashboard(
    dht: hivemind.DHT,
    config: DashboardConfig,
    on_status: Callable[[str], None],
    stop: asyncio.Future | asyncio.Task | None = None,
    sock: socket.socket | None = None,
    dht_maddrs: Sequence[str] = (),
) -> None:
    """Monitor + HTTP server on an already started `dht`, until `stop` completes (forever if None)."""
    sock = sock or bind_http(config.host, config.http_port)
    monitor = HealthMonitor(dht, config.models, config.refresh, config.probe_timeout, dht_maddrs=dht_maddrs)
    server = _Server(uvicorn.Config(create_app(monitor), lifespan="off", access_log=False, log_config=None))
    tasks = [asyncio.create_task(monitor.run_forever()), asyncio.create_task(server.serve(sockets=[sock]))]
    waiters = tasks + ([asyncio.ensure_future(stop)] if stop is not None else [])
    try:
        on_status(
            f"dashboard: {url_of(sock)} watching {', '.join(monitor.models)} (refresh {config.refresh:g}s)"
        )
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in done & set(tasks):
            task.result()  # a crashed monitor or server raises here
    finally:
        server.should_exit = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tasks[1], 5)
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await monitor.close()
        sock.close()


def bind_http(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (raises OSError when the port is taken)."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(f"dashboard cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # SIGINT/SIGTERM are handled by the coordinator or run_dashboard, which then stop us
