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


def _adapters(text: str) -> tuple[str, ...]:
    """--adapters A,B: each checked now (files there, config a LoRA, weights readable), as a line naming the flag."""
    from torchnode.models.lora import AdapterError, find_adapter

    names = tuple(a.strip() for a in text.split(",") if a.strip())
    for source in names:
        try:
            find_adapter(source)
        except AdapterError as e:
            raise typer.BadParameter(str(e), param_hint="--adapters") from None
    return names


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


DEVICE_HELP = "where to compute: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps"
QUANT_CHOICES = ("none", "int8", "int4", "nf4")


def _device(name: str, flag: str = "--device"):
    from torchnode.models.devices import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from None


def _bytes(text: str, flag: str) -> int:
    from torchnode.node.limits import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError:
        raise typer.BadParameter(f"expected a size such as 1GiB or 512MB, got {text!r}", param_hint=flag) from None


def _peers(text: str) -> list[str]:
    return [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]


INSECURE_HELP = "plaintext gRPC instead of TLS, for debugging on loopback; nodes and clients must agree"


def warn_if_insecure(insecure: bool) -> None:
    """The one line every command prints when --insecure turns encryption off."""
    if insecure:
        err.print(
            "[bold yellow]warning:[/] --insecure: gRPC links are plaintext; anyone on the path reads prompts and "
            "hidden states. Use only for debugging on loopback.",
            soft_wrap=True,
        )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Errors a user can fix (no route, a failing node, a bad path or value) end in one red line, exit 1."""
    from torchnode.client.routing import NoRouteError
    from torchnode.client.verification import VerificationError
    from torchnode.protocol.node_client import NodeError

    try:
        yield
    except (NoRouteError, NodeError, VerificationError, FileNotFoundError, ValueError, OSError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None


ADAPTER_HELP = "a LoRA adapter the nodes serve (join --adapters), by name: a directory's base name or a hub id"
ADAPTERS_HELP = "LoRA adapters to serve, comma-separated: PEFT directories (adapter_config.json + adapter_model.safetensors) or hub ids"


VERIFY_HELP = "recompute every node's outputs elsewhere (another node, or this client's weights) before using them"
VERIFY_WINDOW_HELP = "tokens per check: each hop's window is re-run as one prefill; tokens are released once checked"


ALLOW_KEYS_HELP = "private swarm: file of member public keys (one per line, as `torchnode identity` prints them, # comments)"


def allow_keys_of(path: Path | None) -> frozenset[bytes] | None:
    """The keys an --allow-keys file lists; a bad file is a usage error naming the flag."""
    if path is None:
        return None
    from torchnode.protocol.allow_keys import load_allow_keys

    try:
        return load_allow_keys(path)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--allow-keys") from None


def verify_options(verify: bool, verify_window: int) -> dict:
    """SDK keywords of --verify / --verify-window."""
    return {"verify": verify, "verify_window": verify_window} if verify else {}


DRAFT_HELP = "speculative decoding: 'ngram' (prompt lookup) or a small draft model with the same tokenizer [default: off]"
DRAFT_TOKENS_HELP = "most tokens drafted per pass; fewer when drafts are rejected"


@contextlib.contextmanager
def draft_errors() -> Iterator[None]:
    """A --draft that is neither 'ngram' nor a usable draft model: a usage error naming the flag."""
    from torchnode.client.speculative import DraftError

    try:
        yield
    except DraftError as e:
        raise typer.BadParameter(str(e), param_hint="--draft") from None


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


REACHABLE_HELP = "auto: ask a relay to dial this node back, and serve through a relay if it cannot; yes: dialled directly; no: through a relay"


def _reachable(mode: str) -> str:
    if mode not in ("auto", "yes", "no"):
        raise typer.BadParameter(f"expected auto, yes or no, got {mode!r}", param_hint="--reachable")
    return mode


def _relay_limits(max_nodes: int, max_streams: int, bytes_per_second: str):
    from torchnode.node.relay import RelayLimits

    rate = _bytes(bytes_per_second, "--relay-bytes-per-second")
    if rate < 1:
        raise typer.BadParameter("must be at least 1 byte", param_hint="--relay-bytes-per-second")
    return RelayLimits(max_nodes=max_nodes, max_streams=max_streams, bytes_per_second=rate)


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
    dtype: Annotated[str, typer.Option(help="compute dtype: auto (float32 on CPU, bfloat16 on a GPU, float16 where bf16 is missing), float32, bfloat16 or float16")] = "auto",
    quant: Annotated[str, typer.Option(help="none; int8 (8-bit weights, ~0.25x fp32); int4 (4-bit groups of 32, ~0.16x); nf4 (CUDA + bitsandbytes). Not token-exact")] = "none",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    identity: Annotated[Path | None, typer.Option(help="Ed25519 key file [default: ~/.torchnode/node-PORT.key]")] = None,
    max_sessions: Annotated[int, typer.Option(min=1, help="concurrent inference sessions")] = 64,
    cache_memory: Annotated[str, typer.Option(help="KV cache budget over all sessions")] = "1GiB",
    max_session_tokens: Annotated[int, typer.Option(min=1, help="max_length one session may ask for")] = 4096,
    session_timeout: Annotated[float, typer.Option(min=0.001, help="seconds idle before a session closes")] = 300.0,
    max_message_size: Annotated[str, typer.Option(help="largest gRPC message accepted or sent")] = "64MiB",
    max_batch_tokens: Annotated[int, typer.Option(min=1, help="tokens of all sessions in one pass over the span; longer prefills run in chunks")] = 256,
    batch_wait_ms: Annotated[float, typer.Option(min=0.0, max=1000.0, help="ms to wait for more sessions' steps to fill a batch")] = 2.0,
    expiration: Annotated[float, typer.Option(min=1.0, help="seconds a DHT record lives without refresh")] = 30.0,
    rebalance_period: Annotated[float, typer.Option(min=0.0, help="seconds between rebalance checks; 0 = never move")] = 120.0,
    rebalance_threshold: Annotated[float, typer.Option(min=0.0, help="move if the weakest block gains more than this fraction")] = 0.25,
    shutdown_grace: Annotated[float, typer.Option(min=0.0, help="seconds sessions in flight get on SIGTERM")] = 10.0,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default)")] = 0,
    insecure: Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)] = False,
    allow_keys: Annotated[Path | None, typer.Option(help=ALLOW_KEYS_HELP)] = None,
    adapters: Annotated[str, typer.Option(help=ADAPTERS_HELP)] = "",
    reachable: Annotated[str, typer.Option(help=REACHABLE_HELP)] = "auto",
    relay: Annotated[bool, typer.Option("--relay", help="also relay for nodes that cannot be dialled (behind a NAT)")] = False,
    relay_port: Annotated[int, typer.Option(help="the relay's control port (with --relay); 0 picks a free one")] = 0,
    relay_max_nodes: Annotated[int, typer.Option(min=1, help="nodes relayed at once (with --relay)")] = 32,
    relay_max_streams: Annotated[int, typer.Option(min=1, help="client streams relayed at once (with --relay)")] = 256,
    relay_bytes_per_second: Annotated[str, typer.Option(help="bytes per second per relayed node, both ways (with --relay)")] = "16MiB",
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
        raise typer.BadParameter(f"nf4 runs on CUDA only (bitsandbytes); this node is on {torch_device}: use int4", param_hint="--quant")
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
        max_batch_tokens=max_batch_tokens,
        batch_wait=batch_wait_ms / 1000,
    )
    swarm = None
    if peers or new_swarm:
        swarm = SwarmConfig(
            initial_peers=tuple(peers), announce_host=announce_host, dht_port=dht_port, num_blocks=num_blocks,
            max_memory=_bytes(max_memory, "--max-memory") if max_memory else None, expiration=expiration,
            rebalance_period=rebalance_period, rebalance_threshold=rebalance_threshold,
            reachable=_reachable(reachable), relay_port=relay_port,
            relay=_relay_limits(relay_max_nodes, relay_max_streams, relay_bytes_per_second) if relay else None,
        )  # fmt: skip
    elif relay or reachable != "auto":
        raise typer.BadParameter("relays and reachability need a swarm (--initial-peers or --new-swarm)", param_hint="--relay" if relay else "--reachable")
    config = NodeConfig(
        model=model, start=start, end=end, host=host, port=port, dtype=torch_dtype, quant=quant, device=torch_device,
        identity_path=identity or torchnode_home() / f"node-{port}.key", limits=limits,
        shutdown_grace=shutdown_grace, swarm=swarm, insecure=insecure, allow_keys=allow_keys_of(allow_keys),
        adapters=adapter_list,
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
    model: Annotated[list[str] | None, typer.Option(help="show only this model (repeatable) [default: every model in the swarm's index]")] = None,
    refresh: Annotated[float, typer.Option(min=0.1, help="seconds between health scans")] = 5.0,
    insecure: Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)] = False,
    allow_keys: Annotated[Path | None, typer.Option(help=ALLOW_KEYS_HELP)] = None,
    relay: Annotated[bool, typer.Option("--relay", help="also relay for nodes that cannot be dialled (behind a NAT)")] = False,
    relay_port: Annotated[int, typer.Option(help="the relay's control port (with --relay); 0 picks a free one")] = 0,
    relay_max_nodes: Annotated[int, typer.Option(min=1, help="nodes relayed at once (with --relay)")] = 32,
    relay_max_streams: Annotated[int, typer.Option(min=1, help="client streams relayed at once (with --relay)")] = 256,
    relay_bytes_per_second: Annotated[str, typer.Option(help="bytes per second per relayed node, both ways (with --relay)")] = "16MiB",
    identity: Annotated[Path | None, typer.Option(help="the relay's Ed25519 key file [default: ~/.torchnode/relay-PORT.key]")] = None,
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
            from torchnode.protocol.identity import torchnode_home

            limits = _relay_limits(relay_max_nodes, relay_max_streams, relay_bytes_per_second)
            relay_setup = RelaySetup(identity or torchnode_home() / f"relay-{port}.key", relay_port, limits)
        asyncio.run(run_bootstrap(host, port, announce_host, _peers(initial_peers), on_status=status, dashboard=board, allow_keys=allow_keys_of(allow_keys), relay=relay_setup))


@app.command("dashboard")
def dashboard_command(
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
    http_host: Annotated[str, typer.Option(help="dashboard listen address")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="dashboard HTTP port")] = 8080,
    model: Annotated[list[str] | None, typer.Option(help="show only this model (repeatable) [default: every model in the swarm's index]")] = None,
    refresh: Annotated[float, typer.Option(min=0.1, help="seconds between health scans")] = 5.0,
    insecure: Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)] = False,
    allow_keys: Annotated[Path | None, typer.Option(help=ALLOW_KEYS_HELP)] = None,
) -> None:
    """Run the health monitor and web dashboard (/, /api/v1/state, /metrics) on its own DHT client."""
    warn_if_insecure(insecure)
    peers = _peers(initial_peers)
    if not peers:
        raise typer.BadParameter("give the multiaddr of any swarm peer", param_hint="--initial-peers")
    from torchnode.coordinator.dashboard import run_dashboard

    status = lambda m: err.print(f"[bold magenta]dashboard[/] {m}", soft_wrap=True)  # noqa: E731
    with user_errors():
        asyncio.run(run_dashboard(peers, model or [], http_host, http_port, refresh, on_status=status, insecure=insecure, allow_keys=allow_keys_of(allow_keys)))


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
    device: Annotated[str, typer.Option(help=DEVICE_HELP + " for the head (embeddings, LM head)")] = "auto",
    insecure: Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)] = False,
    allow_keys: Annotated[Path | None, typer.Option(help=ALLOW_KEYS_HELP)] = None,
    draft: Annotated[str | None, typer.Option(help=DRAFT_HELP)] = None,
    draft_tokens: Annotated[int, typer.Option(min=1, help=DRAFT_TOKENS_HELP)] = 8,
    verify: Annotated[bool, typer.Option("--verify", help=VERIFY_HELP)] = False,
    verify_window: Annotated[int, typer.Option(min=1, help=VERIFY_WINDOW_HELP)] = 32,
    adapter: Annotated[str | None, typer.Option(help=ADAPTER_HELP)] = None,
) -> None:
    """Generate text through a chain of nodes; tokens stream to stdout."""
    warn_if_insecure(insecure)
    if greedy and temperature > 0:
        raise typer.BadParameter("--greedy and --temperature > 0 contradict each other", param_hint="--greedy")
    torch_wire = _dtype(wire_dtype, "--wire-dtype")
    with user_errors(), draft_errors(), connect(
        model, peers, initial_peers, identity, wire_dtype=torch_wire, step_timeout=step_timeout, insecure=insecure,
        device=str(_device(device)), adapter=adapter,
        draft=draft, draft_tokens=draft_tokens, **verify_options(verify, verify_window), allow_keys=allow_keys_of(allow_keys),
    ) as client:
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
    device: Annotated[str, typer.Option(help=DEVICE_HELP + " for the head (embeddings, LM head)")] = "auto",
    insecure: Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)] = False,
    allow_keys: Annotated[Path | None, typer.Option(help=ALLOW_KEYS_HELP)] = None,
    draft: Annotated[str | None, typer.Option(help=DRAFT_HELP)] = None,
    draft_tokens: Annotated[int, typer.Option(min=1, help=DRAFT_TOKENS_HELP)] = 8,
    verify: Annotated[bool, typer.Option("--verify", help=VERIFY_HELP)] = False,
    verify_window: Annotated[int, typer.Option(min=1, help=VERIFY_WINDOW_HELP)] = 32,
    adapter: Annotated[str | None, typer.Option(help=ADAPTER_HELP)] = None,
) -> None:
    """Interactive multi-turn chat; the conversation's KV cache stays on the nodes between turns."""
    warn_if_insecure(insecure)
    console = Console(highlight=False)
    conversation = [{"role": "system", "content": system}] if system else []
    with user_errors(), draft_errors(), connect(
        model, peers, initial_peers, identity, step_timeout=step_timeout, insecure=insecure, device=str(_device(device)),
        adapter=adapter, draft=draft, draft_tokens=draft_tokens, **verify_options(verify, verify_window), allow_keys=allow_keys_of(allow_keys),
    ) as client:
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
    device: Annotated[str, typer.Option(help=DEVICE_HELP + " for the head (embeddings, LM head)")] = "auto",
    insecure: Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)] = False,
    allow_keys: Annotated[Path | None, typer.Option(help=ALLOW_KEYS_HELP)] = None,
    draft: Annotated[str | None, typer.Option(help=DRAFT_HELP + "; the default of every request")] = None,
    draft_tokens: Annotated[int, typer.Option(min=1, help=DRAFT_TOKENS_HELP)] = 8,
    verify: Annotated[bool, typer.Option("--verify", help=VERIFY_HELP)] = False,
    verify_window: Annotated[int, typer.Option(min=1, help=VERIFY_WINDOW_HELP)] = 32,
    adapter: Annotated[str | None, typer.Option(help=ADAPTER_HELP + "; the default of requests whose model is BASE (BASE:ADAPTER picks one per request)")] = None,
) -> None:
    """Serve an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) over the swarm."""
    warn_if_insecure(insecure)
    if not _peers(peers) and not _peers(initial_peers):
        raise typer.BadParameter("give --initial-peers MULTIADDR (a swarm) or --peers HOST:PORT,...", param_hint="--initial-peers")
    from torchnode.api.runner import run_api

    status = lambda m: err.print(f"[bold green]api[/] {m}", soft_wrap=True)  # noqa: E731
    with user_errors(), draft_errors(), contextlib.suppress(KeyboardInterrupt):  # Ctrl-C while the model is still loading
        asyncio.run(
            run_api(
                model, _peers(peers), _peers(initial_peers), host, port, on_status=status,
                served_name=served_model_name, context_length=context_length,
                identity_path=identity, step_timeout=step_timeout, insecure=insecure, device=str(_device(device)),
                adapter=adapter, draft=draft, draft_tokens=draft_tokens, **verify_options(verify, verify_window), allow_keys=allow_keys_of(allow_keys),
            )  # fmt: skip
        )


@app.command()
def swarm(
    model: Annotated[str, typer.Argument(help="the model to look up ('default', a path, or a hub id)")],
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
    insecure: Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)] = False,
    allow_keys: Annotated[Path | None, typer.Option(help=ALLOW_KEYS_HELP)] = None,
) -> None:
    """Show which node serves which blocks, its state, throughput, RTT and link, and whether all blocks are covered."""
    warn_if_insecure(insecure)
    peers = _peers(initial_peers)
    if not peers:
        raise typer.BadParameter("give the multiaddr of any swarm peer", param_hint="--initial-peers")
    from rich.table import Table

    from torchnode.coordinator.health_monitor import scan_once
    from torchnode.models.checkpoint import swarm_name

    allowed = allow_keys_of(allow_keys)
    name = swarm_name(model)  # no weights needed: the table comes from the DHT and the nodes

    with user_errors():
        state = asyncio.run(scan_once(peers, [name], insecure, allowed))
    view = next((m for m in state.models if m.name == name), None)
    if view is None:
        err.print(f"[red]error:[/] the swarm has no record of {name!r}" + (f" ({state.error})" if state.error else ""))
        raise typer.Exit(1)
    table = Table(title=f"{view.name} · {view.total_blocks} blocks")
    for column in ("peer", "address", "blocks", "state", "health", "tokens/s", "RTT ms", "link"):
        table.add_column(column, justify="right" if column in ("tokens/s", "RTT ms") else "left")
    for n in view.nodes:
        rtt = f"{n.rtt_ms:.1f}" if n.rtt_ms is not None else "[red]-[/]"
        health = n.health if n.problem is None else f"{n.health}: {n.problem}"
        link = "-" if n.encrypted is None else "TLS" if n.encrypted else "[red]plaintext[/]"
        table.add_row(n.short_id, n.address, f"{n.start}:{n.end}", n.state, health, f"{n.throughput:.1f}", rtt, link)
    console = Console()
    console.print(table)
    if view.ready:
        console.print(f"[green]all {view.total_blocks} blocks covered[/]")
    else:
        console.print(f"[red]not covered:[/] blocks {view.missing_ranges or '(unknown model size)'}; generation is not possible")


@app.command("models")
def models_command(
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
    insecure: Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)] = False,
    allow_keys: Annotated[Path | None, typer.Option(help=ALLOW_KEYS_HELP)] = None,
) -> None:
    """List every model the swarm serves (from the DHT model index): coverage, nodes, ready or not."""
    warn_if_insecure(insecure)
    peers = _peers(initial_peers)
    if not peers:
        raise typer.BadParameter("give the multiaddr of any swarm peer", param_hint="--initial-peers")
    from rich.table import Table

    from torchnode.coordinator.health_monitor import scan_once

    with user_errors():
        state = asyncio.run(scan_once(peers, insecure=insecure, allow_keys=allow_keys_of(allow_keys)))
    table = Table(title=f"{len(state.models)} model(s) in the swarm")
    for column in ("model", "family", "blocks covered", "nodes", "tokens/s", "ready"):
        table.add_column(column, justify="right" if column in ("nodes", "tokens/s") else "left")
    for m in state.models:
        covered = sum(b.servers > 0 for b in m.blocks)
        healthy = sum(n.health == "healthy" for n in m.nodes)
        ready = "[green]ready[/]" if m.ready else f"[red]no[/] (missing {m.missing_ranges or 'unknown'})"
        table.add_row(m.name, m.family or "-", f"{covered}/{m.total_blocks}", f"{healthy}/{len(m.nodes)}",
                      f"{m.bottleneck_throughput:.1f}", ready)  # fmt: skip
    Console().print(table)
    if state.error:
        err.print(f"[red]error:[/] {state.error}")
        raise typer.Exit(1)


@app.command()
def identity(
    identity: Annotated[Path | None, typer.Option(help="key file [default: ~/.torchnode/identity.key, the client's]")] = None,
) -> None:
    """Print this key's public key (64 hex digits, as --allow-keys files list them), creating the key if missing."""
    from torchnode.protocol.identity import Identity

    with user_errors():
        print(Identity.load_or_create(identity).public_key.hex())


@app.command("check-evidence")
def check_evidence_command(
    file: Annotated[Path, typer.Argument(help="an evidence file (from $TORCHNODE_HOME/evidence/)")],
    model: Annotated[str, typer.Argument(help="the model it is about ('default', a path, or a hub id): its weights recompute the span")],
) -> None:
    """Check a fraud proof: verify the node's signatures and recompute its span locally. Exit 0: the node
    signed a wrong output (proven); 2: every signed output is right; 1: not a valid evidence file."""
    from torchnode.client.evidence import check_evidence
    from torchnode.models.checkpoint import resolve

    with user_errors():  # EvidenceError is a ValueError: one red line, exit 1
        verdict = check_evidence(file, resolve(model))
    print(verdict.message)
    raise typer.Exit(0 if verdict.proven else 2)


def main() -> None:
    app()
