"""The `torchnode` command: join a swarm as a node, generate through one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Run large language models across volunteer machines.", no_args_is_help=True)
err = Console(stderr=True)

DTYPES = ("float32", "bfloat16", "float16")


def parse_blocks(text: str) -> tuple[int, int | None]:
    """'0:15' -> (0, 15); '15:' -> (15, None), to the last block."""
    try:
        start_text, end_text = text.split(":")
        start = int(start_text)
        end = int(end_text) if end_text else None
    except ValueError:
        raise typer.BadParameter(f"expected START:END such as 0:15, got {text!r}", param_hint="--blocks") from None
    if start < 0 or (end is not None and end <= start):
        raise typer.BadParameter(f"need 0 <= START < END, got {text!r}", param_hint="--blocks")
    return start, end


def _dtype(name: str, flag: str):
    import torch

    if name not in DTYPES:
        raise typer.BadParameter(f"expected one of {', '.join(DTYPES)}, got {name!r}", param_hint=flag)
    return getattr(torch, name)


def _bytes(text: str, flag: str) -> int:
    from torchnode.node.limits import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError:
        raise typer.BadParameter(f"expected a size such as 1GiB or 512MB, got {text!r}", param_hint=flag) from None


def _peers(text: str) -> list[str]:
    return [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Errors a user can fix (no route, a failing node, a bad path or value) end in one red line, exit 1."""
    from torchnode.client.routing import NoRouteError
    from torchnode.protocol.node_client import NodeError

    try:
        yield
    except (NoRouteError, NodeError, FileNotFoundError, ValueError, OSError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None


def connect(model: str, peers: str, initial_peers: str, identity: Path | None, **kwargs):
    """A DistributedModel over the swarm (--initial-peers) or over fixed nodes (--peers)."""
    peer_list, dht_peers = _peers(peers), _peers(initial_peers)
    if not peer_list and not dht_peers:
        raise typer.BadParameter(
            "give --initial-peers MULTIADDR (a swarm) or --peers HOST:PORT,... (fixed nodes)", param_hint="--initial-peers"
        )
    from torchnode.client.model import DistributedModel

    with err.status("loading the model's head and tokenizer, finding nodes"):
        return DistributedModel.from_pretrained(model, peer_list, dht_peers, identity_path=identity, **kwargs)


@app.command()
def join(
    model: Annotated[str, typer.Argument(help="'default', a local directory, a .gguf file, or a hub id")],
    blocks: Annotated[str | None, typer.Option(help="span to serve, START:END (END exclusive) [default: chosen by the swarm, or all]")] = None,
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of any swarm peers (comma-separated): join that swarm")] = "",
    new_swarm: Annotated[bool, typer.Option("--new-swarm", help="start a new swarm with this node as its first peer")] = False,
    num_blocks: Annotated[int | None, typer.Option(min=1, help="blocks to serve when the swarm chooses [default: what fits --max-memory]")] = None,
    max_memory: Annotated[str | None, typer.Option(help="memory for weights, e.g. 8GiB [default: half the RAM]")] = None,
    host: Annotated[str, typer.Option(help="address to listen on (gRPC and DHT); 0.0.0.0 exposes the node")] = "127.0.0.1",
    announce_host: Annotated[str | None, typer.Option(help="address others dial [default: --host]")] = None,
    port: Annotated[int, typer.Option(help="gRPC port")] = 31330,
    dht_port: Annotated[int, typer.Option(help="DHT (p2pd) port; 0 picks a free one")] = 0,
    dtype: Annotated[str, typer.Option(help="compute dtype: float32, bfloat16 or float16")] = "float32",
    quant: Annotated[str, typer.Option(help="none, or int8: 8-bit weights (~0.25x fp32 memory, faster on CPU; not token-exact)")] = "none",
    identity: Annotated[Path | None, typer.Option(help="Ed25519 key file [default: ~/.torchnode/node-PORT.key]")] = None,
    max_sessions: Annotated[int, typer.Option(min=1, help="concurrent inference sessions")] = 64,
    cache_memory: Annotated[str, typer.Option(help="KV cache budget over all sessions")] = "1GiB",
    max_session_tokens: Annotated[int, typer.Option(min=1, help="max_length one session may ask for")] = 4096,
    session_timeout: Annotated[float, typer.Option(min=0.001, help="seconds idle before a session closes")] = 300.0,
    max_message_size: Annotated[str, typer.Option(help="largest gRPC message accepted or sent")] = "64MiB",
    expiration: Annotated[float, typer.Option(min=1.0, help="seconds a DHT record lives without refresh")] = 30.0,
    rebalance_period: Annotated[float, typer.Option(min=0.0, help="seconds between rebalance checks; 0 = never move")] = 120.0,
    rebalance_threshold: Annotated[float, typer.Option(min=0.0, help="move if the weakest block gains more than this fraction")] = 0.25,
    shutdown_grace: Annotated[float, typer.Option(min=0.0, help="seconds sessions in flight get on SIGTERM")] = 10.0,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default)")] = 0,
) -> None:
    """Serve a span of a model's blocks, alone (for --peers clients) or in a swarm."""
    start, end = parse_blocks(blocks) if blocks is not None else (None, None)
    torch_dtype = _dtype(dtype, "--dtype")
    if quant not in ("none", "int8"):
        raise typer.BadParameter(f"expected none or int8, got {quant!r}", param_hint="--quant")
    peers = _peers(initial_peers)
    if peers and new_swarm:
        raise typer.BadParameter("either join a swarm (--initial-peers) or start one (--new-swarm)", param_hint="--new-swarm")
    if num_blocks is not None and blocks is not None:
        raise typer.BadParameter("--num-blocks applies only when the swarm chooses the span", param_hint="--num-blocks")
    from torchnode.node.limits import Limits
    from torchnode.node.server import NodeConfig, SwarmConfig, serve
    from torchnode.protocol.identity import torchnode_home

    if threads:
        import torch

        torch.set_num_threads(threads)
    limits = Limits(
        max_sessions=max_sessions,
        cache_bytes=_bytes(cache_memory, "--cache-memory"),
        max_session_tokens=max_session_tokens,
        session_idle_timeout=session_timeout,
        max_message_bytes=_bytes(max_message_size, "--max-message-size"),
    )
    swarm = None
    if peers or new_swarm:
        swarm = SwarmConfig(
            initial_peers=tuple(peers), announce_host=announce_host, dht_port=dht_port, num_blocks=num_blocks,
            max_memory=_bytes(max_memory, "--max-memory") if max_memory else None, expiration=expiration,
            rebalance_period=rebalance_period, rebalance_threshold=rebalance_threshold,
        )  # fmt: skip
    config = NodeConfig(
        model=model, start=start, end=end, host=host, port=port, dtype=torch_dtype, quant=quant,
        identity_path=identity or torchnode_home() / f"node-{port}.key", limits=limits,
        shutdown_grace=shutdown_grace, swarm=swarm,
    )  # fmt: skip
    logging.basicConfig(level=logging.WARNING)
    with user_errors():
        asyncio.run(serve(config, on_status=lambda m: err.print(f"[bold cyan]node[/] {m}", soft_wrap=True)))
    # Everything the node owns is stopped by now; a helper thread stuck in a third-party call (the DHT's
    # process, a torch pool) must not keep the process alive, so skip interpreter shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def coordinator(
    host: Annotated[str, typer.Option(help="address to listen on; 0.0.0.0 exposes the DHT peer")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="DHT (p2pd) port")] = 31337,
    announce_host: Annotated[str | None, typer.Option(help="address others dial [default: --host]")] = None,
    initial_peers: Annotated[str, typer.Option(help="other peers to connect to (another coordinator, a node)")] = "",
    dashboard: Annotated[bool, typer.Option("--dashboard", help="also run the health monitor and web dashboard")] = False,
    http_host: Annotated[str, typer.Option(help="dashboard listen address")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="dashboard HTTP port")] = 8080,
    model: Annotated[list[str] | None, typer.Option(help="model name to watch (repeatable) [default: the embedded model]")] = None,
    refresh: Annotated[float, typer.Option(min=0.1, help="seconds between health scans")] = 5.0,
) -> None:
    """Run a bootstrap DHT peer (prints the multiaddr others pass as --initial-peers), optionally with the dashboard."""
    from torchnode.coordinator.bootstrap import run_bootstrap

    status = lambda m: err.print(f"[bold magenta]coordinator[/] {m}", soft_wrap=True)  # noqa: E731
    with user_errors():
        board = None
        if dashboard:
            from torchnode.coordinator.dashboard import DashboardConfig
            from torchnode.coordinator.health_monitor import DEFAULT_MODEL_NAME

            board = DashboardConfig(tuple(model or [DEFAULT_MODEL_NAME]), http_host, http_port, refresh)
        asyncio.run(run_bootstrap(host, port, announce_host, _peers(initial_peers), on_status=status, dashboard=board))


@app.command("dashboard")
def dashboard_command(
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
    http_host: Annotated[str, typer.Option(help="dashboard listen address")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="dashboard HTTP port")] = 8080,
    model: Annotated[list[str] | None, typer.Option(help="model name to watch (repeatable) [default: the embedded model]")] = None,
    refresh: Annotated[float, typer.Option(min=0.1, help="seconds between health scans")] = 5.0,
) -> None:
    """Run the health monitor and web dashboard (/, /api/v1/state, /metrics) on its own DHT client."""
    peers = _peers(initial_peers)
    if not peers:
        raise typer.BadParameter("give the multiaddr of any swarm peer", param_hint="--initial-peers")
    from torchnode.coordinator.dashboard import run_dashboard
    from torchnode.coordinator.health_monitor import DEFAULT_MODEL_NAME

    status = lambda m: err.print(f"[bold magenta]dashboard[/] {m}", soft_wrap=True)  # noqa: E731
    with user_errors():
        asyncio.run(run_dashboard(peers, model or [DEFAULT_MODEL_NAME], http_host, http_port, refresh, on_status=status))


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="the model the nodes serve ('default', a path, or a hub id)")],
    prompt: Annotated[str, typer.Argument(help="text to continue (or a chat message with --chat)")],
    peers: Annotated[str, typer.Option(help="comma-separated node addresses host:port (no DHT)")] = "",
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers: find nodes through the DHT")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=0)] = 32,
    greedy: Annotated[bool, typer.Option("--greedy", help="always take the most likely token (default)")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="sampling temperature; 0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the model's chat template")] = False,
    wire_dtype: Annotated[str, typer.Option(help="dtype of hidden states on the wire")] = "float32",
    step_timeout: Annotated[float, typer.Option(min=0.1, help="seconds a node may take per step before failover")] = 30.0,
    identity: Annotated[Path | None, typer.Option(help="client key file [default: ~/.torchnode/identity.key]")] = None,
) -> None:
    """Generate text through a chain of nodes; tokens stream to stdout."""
    if greedy and temperature > 0:
        raise typer.BadParameter("--greedy and --temperature > 0 contradict each other", param_hint="--greedy")
    torch_wire = _dtype(wire_dtype, "--wire-dtype")
    with user_errors(), connect(model, peers, initial_peers, identity, wire_dtype=torch_wire, step_timeout=step_timeout) as client:
        pieces = client.stream(
            prompt, chat=chat, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed,
        )  # fmt: skip
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="the model the nodes serve ('default', a path, or a hub id)")],
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
    peers: Annotated[str, typer.Option(help="comma-separated node addresses host:port (no DHT)")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="longest reply")] = 256,
    max_length: Annotated[int, typer.Option(min=16, help="tokens the whole conversation may take")] = 2048,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    step_timeout: Annotated[float, typer.Option(min=0.1, help="seconds a node may take per step before failover")] = 30.0,
    identity: Annotated[Path | None, typer.Option(help="client key file")] = None,
) -> None:
    """Interactive multi-turn chat; the conversation's KV cache stays on the nodes between turns."""
    console = Console(highlight=False)
    conversation = [{"role": "system", "content": system}] if system else []
    with user_errors(), connect(model, peers, initial_peers, identity, step_timeout=step_timeout) as client:
        console.print("[dim]Type a message; an empty line or Ctrl-D ends the chat.[/]")
        with client.session(max_length=max_length) as session:
            while True:
                console.print("[bold green]you>[/] ", end="")
                line = sys.stdin.readline()
                if not line.strip():
                    break
                conversation.append({"role": "user", "content": line.strip()})
                console.print("[bold cyan]assistant>[/] ", end="")
                reply = ""
                sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
                for piece in session.stream(conversation, **sampling):
                    reply += piece
                    console.print(piece, end="", markup=False)
                console.print()
                conversation.append({"role": "assistant", "content": reply})


@app.command()
def api(
    model: Annotated[str, typer.Argument(help="the model the nodes serve ('default', a path, or a hub id)")],
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
    peers: Annotated[str, typer.Option(help="comma-separated node addresses host:port (no DHT)")] = "",
    host: Annotated[str, typer.Option(help="HTTP listen address; 0.0.0.0 exposes the API")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="model id clients ask for [default: MODEL]")] = None,
    context_length: Annotated[int | None, typer.Option(min=1, help="prompt + completion limit [default: the model's, at most 2048]")] = None,
    step_timeout: Annotated[float, typer.Option(min=0.1, help="seconds a node may take per step before failover")] = 30.0,
    identity: Annotated[Path | None, typer.Option(help="client key file")] = None,
) -> None:
    """Serve an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) over the swarm."""
    if not _peers(peers) and not _peers(initial_peers):
        raise typer.BadParameter("give --initial-peers MULTIADDR (a swarm) or --peers HOST:PORT,...", param_hint="--initial-peers")
    from torchnode.api.runner import run_api

    status = lambda m: err.print(f"[bold green]api[/] {m}", soft_wrap=True)  # noqa: E731
    with user_errors(), contextlib.suppress(KeyboardInterrupt):  # Ctrl-C while the model is still loading
        asyncio.run(
            run_api(
                model, _peers(peers), _peers(initial_peers), host, port, on_status=status,
                served_name=served_model_name, context_length=context_length,
                identity_path=identity, step_timeout=step_timeout,
            )  # fmt: skip
        )


@app.command()
def swarm(
    model: Annotated[str, typer.Argument(help="the model to look up ('default', a path, or a hub id)")],
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
) -> None:
    """Show which node serves which blocks, its state, throughput and RTT, and whether all blocks are covered."""
    peers = _peers(initial_peers)
    if not peers:
        raise typer.BadParameter("give the multiaddr of any swarm peer", param_hint="--initial-peers")
    from rich.table import Table

    from torchnode.coordinator.health_monitor import HealthMonitor
    from torchnode.models.checkpoint import resolve
    from torchnode.protocol.dht_network import start_dht

    async def one_scan():
        name = (await asyncio.to_thread(resolve, model)).name
        dht = await asyncio.to_thread(start_dht, peers, client_mode=True)
        monitor = HealthMonitor(dht, [name])
        try:
            return (await monitor.scan()).models[0]
        finally:
            await monitor.close()
            await asyncio.to_thread(dht.shutdown)

    with user_errors():
        view = asyncio.run(one_scan())
    table = Table(title=f"{view.name} · {view.total_blocks} blocks")
    for column in ("peer", "address", "blocks", "state", "health", "tokens/s", "RTT ms"):
        table.add_column(column, justify="right" if column in ("tokens/s", "RTT ms") else "left")
    for n in view.nodes:
        rtt = f"{n.rtt_ms:.1f}" if n.rtt_ms is not None else "[red]-[/]"
        health = n.health if n.problem is None else f"{n.health}: {n.problem}"
        table.add_row(n.short_id, n.address, f"{n.start}:{n.end}", n.state, health, f"{n.throughput:.1f}", rtt)
    console = Console()
    console.print(table)
    if view.ready:
        console.print(f"[green]all {view.total_blocks} blocks covered[/]")
    else:
        console.print(f"[red]not covered:[/] blocks {view.missing_ranges or '(unknown model size)'}; generation is not possible")


def main() -> None:
    app()
