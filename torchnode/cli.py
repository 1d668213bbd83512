"""The `torchnode` command: join a swarm as a node, generate through one."""

from __future__ import annotations

import asyncio
import logging
import sys
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


@app.command()
def join(
    model: Annotated[str, typer.Argument(help="'default', a local directory, a .gguf file, or a hub id")],
    blocks: Annotated[str, typer.Option(help="span to serve, START:END (END exclusive)")] = "0:",
    host: Annotated[str, typer.Option(help="address to listen on; 0.0.0.0 exposes the node")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port")] = 31330,
    dtype: Annotated[str, typer.Option(help="compute dtype: float32, bfloat16 or float16")] = "float32",
    identity: Annotated[Path | None, typer.Option(help="Ed25519 key file [default: ~/.torchnode/node-PORT.key]")] = None,
    max_sessions: Annotated[int, typer.Option(min=1, help="concurrent inference sessions")] = 64,
    cache_memory: Annotated[str, typer.Option(help="KV cache budget over all sessions")] = "1GiB",
    max_session_tokens: Annotated[int, typer.Option(min=1, help="max_length one session may ask for")] = 4096,
    session_timeout: Annotated[float, typer.Option(min=0.001, help="seconds idle before a session closes")] = 300.0,
    max_message_size: Annotated[str, typer.Option(help="largest gRPC message accepted or sent")] = "64MiB",
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default)")] = 0,
) -> None:
    """Serve a span of a model's blocks to the swarm."""
    start, end = parse_blocks(blocks)
    torch_dtype = _dtype(dtype, "--dtype")
    from torchnode.node.limits import Limits
    from torchnode.node.server import NodeConfig, serve
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
    config = NodeConfig(
        model=model, start=start, end=end, host=host, port=port, dtype=torch_dtype,
        identity_path=identity or torchnode_home() / f"node-{port}.key", limits=limits,
    )  # fmt: skip
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(serve(config, on_status=lambda m: err.print(f"[bold cyan]node[/] {m}")))
    except (FileNotFoundError, ValueError, OSError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="the model the nodes serve ('default', a path, or a hub id)")],
    prompt: Annotated[str, typer.Argument(help="text to continue (or a chat message with --chat)")],
    peers: Annotated[str, typer.Option(help="comma-separated node addresses host:port")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=0)] = 32,
    greedy: Annotated[bool, typer.Option("--greedy", help="always take the most likely token (default)")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="sampling temperature; 0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the model's chat template")] = False,
    wire_dtype: Annotated[str, typer.Option(help="dtype of hidden states on the wire")] = "float32",
    identity: Annotated[Path | None, typer.Option(help="client key file [default: ~/.torchnode/identity.key]")] = None,
) -> None:
    """Generate text through a chain of nodes; tokens stream to stdout."""
    peer_list = [p.strip() for p in peers.split(",") if p.strip()]
    if not peer_list:
        raise typer.BadParameter("give at least one node address, e.g. 127.0.0.1:31330", param_hint="--peers")
    if greedy and temperature > 0:
        raise typer.BadParameter("--greedy and --temperature > 0 contradict each other", param_hint="--greedy")
    torch_wire = _dtype(wire_dtype, "--wire-dtype")
    from torchnode.client.model import DistributedModel
    from torchnode.client.routing import NoRouteError
    from torchnode.client.transport import NodeError

    try:
        with err.status("loading the model's head and tokenizer"):
            model_obj = DistributedModel.from_pretrained(model, peer_list, identity, wire_dtype=torch_wire)
        with model_obj:
            pieces = model_obj.stream(
                prompt, chat=chat, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, top_k=top_k, seed=seed,
            )  # fmt: skip
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
    except (NoRouteError, NodeError, FileNotFoundError, ValueError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None


def main() -> None:
    app()
