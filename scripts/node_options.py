"""The node options the loopback benchmarks share (bench_batching.py, bench_overhead.py): each starts its own
nodes with the CLI, and a figure beside the defaults is one of these flags turned."""

from __future__ import annotations

import argparse


def add_node_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--node-threads", type=int, default=0, help="the nodes' --threads (0: their default, torch's: the CPUs)"
    )
    parser.add_argument(
        "--huge-pages",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the nodes' --huge-pages (their default) or --no-huge-pages",
    )


def node_flags(args: argparse.Namespace) -> list[str]:
    """The `torchnode join` flags for what `add_node_options` parsed."""
    return ["--threads", str(args.node_threads), "--huge-pages" if args.huge_pages else "--no-huge-pages"]
