"""Time from `torchnode join` to the node answering as online in the DHT, and time for a client to find
a full route, for 1 coordinator + 4 nodes of the embedded SmolLM2 on loopback (--num-blocks 10 each).

    .venv/bin/python scripts/bench_join.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from swarm import free_port, start_coordinator, start_node, stop_all  # noqa: E402

MODEL_NAME = "SmolLM2-135M-Instruct"


def main() -> None:
    from torchnode.client.model import AsyncDistributedModel
    from torchnode.models.checkpoint import resolve
    from torchnode.protocol.dht.network import find_servers, start_dht

    resolve("default")  # the one-time GGUF conversion is not part of joining
    coordinator, maddr = start_coordinator()
    watcher = start_dht([maddr], client_mode=True)
    nodes, joins = [], []
    try:
        for _ in range(4):
            port = free_port()
            started = time.perf_counter()
            nodes.append(start_node("default", "--initial-peers", maddr, "--num-blocks", "10", port=port, wait=False))
            while True:
                servers = find_servers(watcher, MODEL_NAME, 30)
                if any(r.address.endswith(f":{port}") and r.state == "online" for rs in servers.values() for r in rs):
                    break
                time.sleep(0.05)
            joins.append(time.perf_counter() - started)
            print(f"node {len(nodes)} online after {joins[-1]:.2f}s", flush=True)

        async def client_times() -> tuple[float, list[float]]:
            started = time.perf_counter()
            model = await AsyncDistributedModel.from_pretrained("default", initial_peers=[maddr])
            ready = time.perf_counter() - started
            routes = []
            for _ in range(5):
                t = time.perf_counter()
                hops = await model.route()
                routes.append(time.perf_counter() - t)
            print("route:", " -> ".join(f"{h.node.address} [{h.start}:{h.end})" for h in hops))
            await model.close()
            return ready, routes

        ready, routes = asyncio.run(client_times())
    finally:
        watcher.shutdown()
        stop_all(nodes)
        coordinator.stop()
    print(
        f"join -> online in the DHT: median {statistics.median(joins):.2f}s "
        f"(each: {', '.join(f'{j:.2f}' for j in joins)})"
    )
    print(f"client start (DHT bootstrap + head + tokenizer): {ready:.2f}s")
    print(f"full route (DHT lookup + Info probes + Dijkstra): median {statistics.median(routes) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
