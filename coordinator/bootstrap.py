"""A bootstrap DHT peer: the first address of a swarm, optional and replaceable by any live node.

With `dashboard=DashboardConfig(...)` the same process also runs the health monitor and the dashboard
on this peer's DHT (no second DHT peer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import hivemind

from ..protocol.dht.network import start_dht, visible_maddrs
from ..protocol.serving import bounded, until_signal

if TYPE_CHECKING:
    from .dashboard import DashboardConfig


class BesideDht(Protocol):
    """A service the bootstrap peer runs on its own DHT until it stops: `coordinator --relay` passes node/relay.py's
    RelaySetup. A protocol, so the coordinator needs no import of node/ (the README's layer order)."""

    async def run(
        self, dht: hivemind.DHT, host: str, announce_host: str | None, on_status: Callable[[str], None]
    ) -> None: ...


async def run_bootstrap(
    host: str,
    port: int,
    announce_host: str | None,
    initial_peers: Sequence[str],
    on_status: Callable[[str], None] = print,
    dashboard: DashboardConfig | None = None,
    allow_keys: frozenset[bytes] | None = None,  # private swarm: accept DHT records only from these keys
    relay: BesideDht | None = None,  # --relay: also relay for nodes that cannot be dialled (node/relay.py)
) -> None:
    sock = None
    if dashboard is not None:
        from .dashboard import bind_http, serve_dashboard  # fastapi, uvicorn: the `api` extra

        sock = bind_http(dashboard.host, dashboard.http_port)  # before the DHT: a busy port fails fast
    dht = await asyncio.to_thread(start_dht, list(initial_peers), host, port, announce_host, allow_keys=allow_keys)
    try:
        maddrs = visible_maddrs(dht)
        relay_task = None
        if relay is not None:
            relay_task = asyncio.create_task(relay.run(dht, host, announce_host, on_status))
        on_status(f"ready: --initial-peers {','.join(maddrs)}")
        if dashboard is None:
            await until_signal()
        else:
            await serve_dashboard(dht, dashboard, on_status, until_signal(), sock=sock, dht_maddrs=maddrs)
    finally:
        if relay is not None and relay_task is not None:
            relay_task.cancel()
        if sock is not None:
            sock.close()
        await bounded(asyncio.to_thread(dht.shutdown), "stopping the DHT")
        on_status("stopped")
