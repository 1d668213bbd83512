"""Commands that serve: `join` (a node), `coordinator` (bootstrap peer, dashboard, relay), `dashboard`."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import (
    ADAPTERS_HELP,
    DEVICE_HELP,
    QUANT_CHOICES,
    REACHABLE_HELP,
    AllowKeys,
    HttpHost,
    HttpPort,
    Insecure,
    Refresh,
    ShownModels,
    _adapters,
    _bytes,
    _device,
    _dtype,
    _peers,
    _reachable,
    _relay_limits,
    allow_keys_of,
    err,
    parse_blocks,
    swarm_peers,
    user_errors,
    warn_if_insecure,
)


def join(
    model: Annotated[str, typer.Argument(help="'default', a local directory, a .gguf file, or a hub id")],
    blocks: Annotated[
        str | None, typer.Option(help="span to serve, START:END (END exclusive) [default: chosen by the swarm, or all]")
    ] = None,
    initial_peers: Annotated[
        str, typer.Option(help="multiaddrs of any swarm peers (comma-separated): join that swarm")
    ] = "",
    new_swarm: Annotated[
        bool, typer.Option("--new-swarm", help="start a new swarm with this node as its first peer")
    ] = False,
    num_blocks: Annotated[
        int | None, typer.Option(min=1, help="blocks to serve when the swarm chooses [default: what fits --max-memory]")
    ] = None,
    max_memory: Annotated[
        str | None, typer.Option(help="memory for weights, e.g. 8GiB [default: half the RAM]")
    ] = None,
    host: Annotated[
        str, typer.Option(help="address to listen on (gRPC and DHT); 0.0.0.0 exposes the node")
    ] = "127.0.0.1",
    announce_host: Annotated[str | None, typer.Option(help="address others dial [default: --host]")] = None,
    port: Annotated[int, typer.Option(help="gRPC port")] = 31330,
    dht_port: Annotated[int, typer.Option(help="DHT (p2pd) port; 0 picks a free one")] = 0,
    dtype: Annotated[
        str,
        typer.Option(
            help="compute dtype: auto (float32 on CPU, bfloat16 on a GPU, float16 where bf16 is missing), float32, bfloat16 or float16"
        ),
    ] = "auto",
    quant: Annotated[
        str,
        typer.Option(
            help="none; int8 (8-bit weights, ~0.25x fp32); int4 (4-bit groups of 32, ~0.16x); nf4 (CUDA + bitsandbytes). Not token-exact"
        ),
    ] = "none",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    identity: Annotated[
        Path | None, typer.Option(help="Ed25519 key file [default: ~/.torchnode/node-PORT.key]")
    ] = None,
    max_sessions: Annotated[int, typer.Option(min=1, help="concurrent inference sessions")] = 64,
    cache_memory: Annotated[str, typer.Option(help="KV cache budget over all sessions")] = "1GiB",
    max_session_tokens: Annotated[int, typer.Option(min=1, help="max_length one session may ask for")] = 4096,
    session_timeout: Annotated[float, typer.Option(min=0.001, help="seconds idle before a session closes")] = 300.0,
    max_message_size: Annotated[str, typer.Option(help="largest gRPC message accepted or sent")] = "64MiB",
    max_batch_tokens: Annotated[
        int, typer.Option(min=1, help="tokens of all sessions in one pass over the span; longer prefills run in chunks")
    ] = 256,
    batch_wait_ms: Annotated[
        float, typer.Option(min=0.0, max=1000.0, help="ms to wait for more sessions' steps to fill a batch")
    ] = 5.0,
    push_timeout: Annotated[
        float, typer.Option(min=0.001, help="seconds to reach the next node when pushing an output to it")
    ] = 5.0,
    push_wait: Annotated[
        float, typer.Option(min=0.001, help="seconds a pushed input waits for the client's step")
    ] = 60.0,
    max_pushed: Annotated[
        int, typer.Option(min=1, help="pushed inputs kept while their steps have not arrived")
    ] = 4096,
    expiration: Annotated[float, typer.Option(min=1.0, help="seconds a DHT record lives without refresh")] = 30.0,
    rebalance_period: Annotated[
        float, typer.Option(min=0.0, help="seconds between rebalance checks; 0 = never move")
    ] = 120.0,
    rebalance_threshold: Annotated[
        float, typer.Option(min=0.0, help="move if the weakest block gains more than this fraction")
    ] = 0.25,
    shutdown_grace: Annotated[float, typer.Option(min=0.0, help="seconds sessions in flight get on SIGTERM")] = 10.0,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default)")] = 0,
    insecure: Insecure = False,
    allow_keys: AllowKeys = None,
    adapters: Annotated[str, typer.Option(help=ADAPTERS_HELP)] = "",
    reachable: Annotated[str, typer.Option(help=REACHABLE_HELP)] = "auto",
    relay: Annotated[
        bool, typer.Option("--relay", help="also relay for nodes that cannot be dialled (behind a NAT)")
    ] = False,
    relay_port: Annotated[int, typer.Option(help="the relay's control port (with --relay); 0 picks a free one")] = 0,
    relay_max_nodes: Annotated[int, typer.Option(min=1, help="nodes relayed at once (with --relay)")] = 32,
    relay_max_streams: Annotated[int, typer.Option(min=1, help="client streams relayed at once (with --relay)")] = 256,
    relay_bytes_per_second: Annotated[
        str, typer.Option(help="bytes per second per relayed node, both ways (with --relay)")
    ] = "16MiB",
) -> None:
    """Serve a span of a model's blocks, alone (for --peers clients) or in a swarm."""
    warn_if_insecure(insecure)
    adapter_list = _adapters(adapters)
    start, end = parse_blocks(blocks) if blocks is not None else (None, None)
    torch_dtype = None if dtype == "auto" else _dtype(dtype, "--dtype")
    torch_device = _device(device)
    if quant not in QUANT_CHOICES:
        raise typer.BadParameter(f"expected one of {', '.join(QUANT_CHOICES)}, got {quant!r}", param_hint="--quant")
    if quant == "nf4" and torch_device.type != "cuda":
        raise typer.BadParameter(
            f"nf4 runs on CUDA only (bitsandbytes); this node is on {torch_device}: use int4", param_hint="--quant"
        )
    peers = _peers(initial_peers)
    if peers and new_swarm:
        raise typer.BadParameter(
            "either join a swarm (--initial-peers) or start one (--new-swarm)", param_hint="--new-swarm"
        )
    if num_blocks is not None and blocks is not None:
        raise typer.BadParameter("--num-blocks applies only when the swarm chooses the span", param_hint="--num-blocks")
    from torchnode.node.limits import Limits
    from torchnode.node.server import NodeConfig, SwarmConfig, serve
    from torchnode.protocol.wire.identity import torchnode_home

    if threads:
        import torch

        torch.set_num_threads(threads)
    limits = Limits(
        max_sessions=max_sessions,
        cache_bytes=_bytes(cache_memory, "--cache-memory"),
        max_session_tokens=max_session_tokens,
        session_idle_timeout=session_timeout,
        max_message_bytes=_bytes(max_message_size, "--max-message-size"),
        max_batch_tokens=max_batch_tokens,
        batch_wait=batch_wait_ms / 1000,
        push_timeout=push_timeout,
        push_wait=push_wait,
        max_pushed=max_pushed,
    )
    swarm = None
    if peers or new_swarm:
        swarm = SwarmConfig(
            initial_peers=tuple(peers),
            announce_host=announce_host,
            dht_port=dht_port,
            num_blocks=num_blocks,
            max_memory=_bytes(max_memory, "--max-memory") if max_memory else None,
            expiration=expiration,
            rebalance_period=rebalance_period,
            rebalance_threshold=rebalance_threshold,
            reachable=_reachable(reachable),
            relay_port=relay_port,
            relay=_relay_limits(relay_max_nodes, relay_max_streams, relay_bytes_per_second) if relay else None,
        )
    elif relay or reachable != "auto":
        raise typer.BadParameter(
            "relays and reachability need a swarm (--initial-peers or --new-swarm)",
            param_hint="--relay" if relay else "--reachable",
        )
    config = NodeConfig(
        model=model,
        start=start,
        end=end,
        host=host,
        port=port,
        dtype=torch_dtype,
        quant=quant,
        device=torch_device,
        identity_path=identity or torchnode_home() / f"node-{port}.key",
        limits=limits,
        shutdown_grace=shutdown_grace,
        swarm=swarm,
        insecure=insecure,
        allow_keys=allow_keys_of(allow_keys),
        adapters=adapter_list,
    )
    logging.basicConfig(level=logging.WARNING)
    with user_errors():
        asyncio.run(serve(config, on_status=lambda m: err.print(f"[bold cyan]node[/] {m}", soft_wrap=True)))
    # Everything the node owns is stopped by now; a helper thread stuck in a third-party call (the DHT's
    # process, a torch pool) must not keep the process alive, so skip interpreter shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def coordinator(
    host: Annotated[str, typer.Option(help="address to listen on; 0.0.0.0 exposes the DHT peer")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="DHT (p2pd) port")] = 31337,
    announce_host: Annotated[str | None, typer.Option(help="address others dial [default: --host]")] = None,
    initial_peers: Annotated[str, typer.Option(help="other peers to connect to (another coordinator, a node)")] = "",
    dashboard: Annotated[
        bool, typer.Option("--dashboard", help="also run the health monitor and web dashboard")
    ] = False,
    http_host: HttpHost = "127.0.0.1",
    http_port: HttpPort = 8080,
    model: ShownModels = None,
    refresh: Refresh = 5.0,
    insecure: Insecure = False,
    allow_keys: AllowKeys = None,
    relay: Annotated[
        bool, typer.Option("--relay", help="also relay for nodes that cannot be dialled (behind a NAT)")
    ] = False,
    relay_port: Annotated[int, typer.Option(help="the relay's control port (with --relay); 0 picks a free one")] = 0,
    relay_max_nodes: Annotated[int, typer.Option(min=1, help="nodes relayed at once (with --relay)")] = 32,
    relay_max_streams: Annotated[int, typer.Option(min=1, help="client streams relayed at once (with --relay)")] = 256,
    relay_bytes_per_second: Annotated[
        str, typer.Option(help="bytes per second per relayed node, both ways (with --relay)")
    ] = "16MiB",
    identity: Annotated[
        Path | None, typer.Option(help="the relay's Ed25519 key file [default: ~/.torchnode/relay-PORT.key]")
    ] = None,
) -> None:
    """Run a bootstrap DHT peer (prints the multiaddr others pass as --initial-peers), optionally with the dashboard."""
    warn_if_insecure(insecure)
    from torchnode.coordinator.bootstrap import run_bootstrap

    status = lambda m: err.print(f"[bold magenta]coordinator[/] {m}", soft_wrap=True)  # noqa: E731
    with user_errors():
        board = None
        if dashboard:
            from torchnode.coordinator.dashboard import DashboardConfig

            board = DashboardConfig(tuple(model or ()), http_host, http_port, refresh, insecure=insecure)
        relay_setup = None
        if relay:
            from torchnode.node.relay import RelaySetup
            from torchnode.protocol.wire.identity import torchnode_home

            limits = _relay_limits(relay_max_nodes, relay_max_streams, relay_bytes_per_second)
            relay_setup = RelaySetup(identity or torchnode_home() / f"relay-{port}.key", relay_port, limits)
        asyncio.run(
            run_bootstrap(
                host,
                port,
                announce_host,
                _peers(initial_peers),
                on_status=status,
                dashboard=board,
                allow_keys=allow_keys_of(allow_keys),
                relay=relay_setup,
            )
        )


def dashboard_command(
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
    http_host: HttpHost = "127.0.0.1",
    http_port: HttpPort = 8080,
    model: ShownModels = None,
    refresh: Refresh = 5.0,
    insecure: Insecure = False,
    allow_keys: AllowKeys = None,
) -> None:
    """Run the health monitor and web dashboard (/, /api/v1/state, /metrics) on its own DHT client."""
    warn_if_insecure(insecure)
    peers = swarm_peers(initial_peers)
    from torchnode.coordinator.dashboard import run_dashboard

    status = lambda m: err.print(f"[bold magenta]dashboard[/] {m}", soft_wrap=True)  # noqa: E731
    with user_errors():
        asyncio.run(
            run_dashboard(
                peers,
                model or [],
                http_host,
                http_port,
                refresh,
                on_status=status,
                insecure=insecure,
                allow_keys=allow_keys_of(allow_keys),
            )
        )
