"""A bootstrap DHT peer: the first address of a swarm, optional and replaceable by any live node."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence

from ..protocol.dht_network import start_dht, visible_maddrs


async def run_bootstrap(
    host: str,
    port: int,
    announce_host: str | None,
    initial_peers: Sequence[str],
    on_status: Callable[[str], None] = print,
) -> None:
    dht = await asyncio.to_thread(start_dht, list(initial_peers), host, port, announce_host)
    try:
        maddrs = visible_maddrs(dht)
        on_status(f"ready: --initial-peers {','.join(maddrs)}")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await asyncio.to_thread(dht.shutdown)
        on_status("stopped")
