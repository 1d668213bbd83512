"""Runs the health monitor and the dashboard's HTTP server: on its own DHT peer (`run_dashboard`), or
inside a coordinator next to its bootstrap peer (`serve_dashboard`, called by `run_bootstrap`).

The HTTP socket is bound before anything slow starts (a busy port fails at once; port 0 picks a free
one that the status line reports); signals belong to the caller (protocol/serving.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hivemind

from ..protocol.dht.network import start_dht
from ..protocol.serving import bind_tcp, bounded, serve_http, until_signal, url_of
from ..protocol.wire.identity import torchnode_home
from .dashboard_app import create_app
from .evidence_store import EvidenceLimits, EvidenceStore
from .health_monitor import DEFAULT_PROBE_TIMEOUT, DEFAULT_REFRESH, HealthMonitor, model_name
from .volunteers import DEFAULT_CAP_FACTOR, VolunteerLedger

DEFAULT_HTTP_PORT = 8080


@dataclass(frozen=True)
class DashboardConfig:
    models: tuple[str, ...] = ()  # a filter of swarm model names ("default" = the embedded model); empty: all
    host: str = "127.0.0.1"  # HTTP listen address; 0.0.0.0 shows the dashboard to everyone
    http_port: int = DEFAULT_HTTP_PORT  # 0 picks a free port
    refresh: float = DEFAULT_REFRESH  # seconds between scans
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT
    insecure: bool = False  # probe nodes over plaintext (--insecure)
    speed_probe: bool = True  # time a one-token pass through each healthy node per scan (--no-speed-probe: off)
    check_models: tuple[str, ...] = ()  # --check-model: checkpoints uploaded fraud proofs are re-checked with
    evidence: EvidenceLimits = field(default_factory=EvidenceLimits)  # --evidence-max-bytes, --evidence-max-files
    evidence_folder: Path | None = None  # where uploaded proofs are kept [default: $TORCHNODE_HOME/monitor-evidence]
    chat_url: str | None = None  # a `torchnode api` chat page to link ready models to (--chat-url)
    volunteers_file: Path | None = None  # where credit for volunteers persists (--volunteers-file); None: memory
    credit_cap_factor: float = DEFAULT_CAP_FACTOR  # --credit-cap-factor (volunteers.py)

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(dict.fromkeys(model_name(m) for m in self.models)))
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"--http-port {self.http_port} is not a TCP port")
        if not self.refresh > 0 or not self.probe_timeout > 0:
            raise ValueError("--refresh and the probe timeout must be positive")
        ipaddress.ip_address(self.host)  # ValueError: the HTTP host must be an IP address
        if not self.credit_cap_factor > 0:
            raise ValueError("--credit-cap-factor must be positive")
        if self.chat_url is not None and not self.chat_url.startswith(("http://", "https://", "/")):
            raise ValueError(f"--chat-url must be an http(s) URL or a path, got {self.chat_url!r}")


async def run_dashboard(
    initial_peers: list[str],
    config: DashboardConfig,
    on_status: Callable[[str], None] = print,
    allow_keys: frozenset[bytes] | None = None,
) -> None:
    """A standalone dashboard: joins the swarm as a DHT client (a private one's with `allow_keys`), serves
    `config` until SIGINT/SIGTERM."""
    if not initial_peers:
        raise ValueError("give the multiaddr of any swarm peer (--initial-peers)")
    sock = bind_http(config.host, config.http_port)  # before the DHT: a busy port fails fast
    try:
        dht = await asyncio.to_thread(start_dht, list(initial_peers), client_mode=True, allow_keys=allow_keys)
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
    stop: Awaitable[None],
    sock: socket.socket | None = None,
    dht_maddrs: Sequence[str] = (),
) -> None:
    """Monitor + HTTP server on an already started `dht`, until `stop` completes."""
    sock = sock or bind_http(config.host, config.http_port)
    folder = config.evidence_folder or torchnode_home() / "monitor-evidence"
    evidence = EvidenceStore(folder, config.check_models, config.evidence)
    ledger = VolunteerLedger(config.volunteers_file, config.credit_cap_factor)  # a bad file fails here, at start
    monitor = HealthMonitor(
        dht,
        config.models,
        config.refresh,
        config.probe_timeout,
        dht_maddrs=dht_maddrs,
        insecure=config.insecure,
        speed_probe=config.speed_probe,
        evidence=evidence,
        volunteers=ledger,
    )
    scans = asyncio.create_task(monitor.run_forever())
    checks = asyncio.create_task(evidence.run_checks())

    def ready() -> None:
        watching = ", ".join(monitor.filter) or "every model in the index"
        on_status(f"dashboard: {url_of(sock)} watching {watching} (refresh {config.refresh:g}s)")

    try:
        await serve_http(create_app(monitor, chat_url=config.chat_url), sock, _first(stop, scans), on_ready=ready)
        if scans.done():
            scans.result()  # a crashed monitor raises here
    finally:
        scans.cancel()
        checks.cancel()
        await asyncio.gather(scans, checks, return_exceptions=True)
        await bounded(monitor.close(), "closing probe channels")
        sock.close()


async def _first(*waits: Awaitable) -> None:
    """Returns when any of `waits` completes (the stop signal, or the monitor task ending)."""
    futures = [asyncio.ensure_future(w) for w in waits]
    await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)


def bind_http(host: str, port: int) -> socket.socket:
    """The dashboard's listening socket (OSError when the port is taken, ValueError for a bad host)."""
    return bind_tcp(host, port, "dashboard")
