"""`python -m torchnode.coordinator.dashboard_main`: the dashboard without the typer CLI (tests, scripts).

    python -m torchnode.coordinator.dashboard_main --initial-peers ADDR [--model NAME ...] [--http-port 8080]
    python -m torchnode.coordinator.dashboard_main --coordinator-port 31337 [--model NAME ...]   # + bootstrap peer

Prints the same status lines as `torchnode dashboard` / `torchnode coordinator --dashboard`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .bootstrap import run_bootstrap
from .dashboard import DEFAULT_HTTP_PORT, DashboardConfig, run_dashboard
from .health_monitor import DEFAULT_MODEL_NAME, DEFAULT_REFRESH


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torchnode.coordinator.dashboard_main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--initial-peers", action="append", default=[], help="multiaddrs of swarm peers")
    parser.add_argument("--model", action="append", default=[], help=f"model to watch [{DEFAULT_MODEL_NAME}]")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP listen address")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="HTTP port (0: a free one)")
    parser.add_argument("--refresh", type=float, default=DEFAULT_REFRESH, help="seconds between scans")
    parser.add_argument("--coordinator-port", type=int, help="also run a bootstrap DHT peer on this port")
    args = parser.parse_args(argv)
    peers = [p for arg in args.initial_peers for p in arg.split(",") if p]
    models = args.model or [DEFAULT_MODEL_NAME]
    logging.basicConfig(level=logging.WARNING)

    def status(message: str) -> None:
        print(message, flush=True)

    try:
        if args.coordinator_port is not None:
            config = DashboardConfig(tuple(models), args.host, args.http_port, args.refresh)
            asyncio.run(run_bootstrap("127.0.0.1", args.coordinator_port, None, peers, status, dashboard=config))
        else:
            asyncio.run(run_dashboard(peers, models, args.host, args.http_port, args.refresh, status))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
