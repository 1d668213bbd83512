"""Commands that generate through a swarm: `generate`, `chat`, `api`."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .cli_options import (
    ADAPTER_HELP,
    DRAFT_HELP,
    Adapter,
    AllowKeys,
    Draft,
    DraftTokens,
    HeadDevice,
    Insecure,
    Push,
    StepTimeout,
    Verify,
    VerifyWindow,
    _device,
    _dtype,
    _peers,
    allow_keys_of,
    connect,
    draft_errors,
    err,
    user_errors,
    verify_options,
    warn_if_insecure,
)


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
    step_timeout: StepTimeout = 30.0,
    identity: Annotated[Path | None, typer.Option(help="client key file [default: ~/.torchnode/identity.key]")] = None,
    device: HeadDevice = "auto",
    insecure: Insecure = False,
    allow_keys: AllowKeys = None,
    draft: Draft = None,
    draft_tokens: DraftTokens = 8,
    verify: Verify = False,
    verify_window: VerifyWindow = 32,
    adapter: Adapter = None,
    push: Push = True,
) -> None:
    """Generate text through a chain of nodes; tokens stream to stdout."""
    warn_if_insecure(insecure)
    if greedy and temperature > 0:
        raise typer.BadParameter("--greedy and --temperature > 0 contradict each other", param_hint="--greedy")
    torch_wire = _dtype(wire_dtype, "--wire-dtype")
    with (
        user_errors(),
        draft_errors(),
        connect(
            model,
            peers,
            initial_peers,
            identity,
            wire_dtype=torch_wire,
            step_timeout=step_timeout,
            insecure=insecure,
            device=str(_device(device)),
            adapter=adapter,
            push=push,
            draft=draft,
            draft_tokens=draft_tokens,
            **verify_options(verify, verify_window),
            allow_keys=allow_keys_of(allow_keys),
        ) as client,
    ):
        pieces = client.stream(
            prompt,
            chat=chat,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
        )
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


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
    step_timeout: StepTimeout = 30.0,
    identity: Annotated[Path | None, typer.Option(help="client key file")] = None,
    device: HeadDevice = "auto",
    insecure: Insecure = False,
    allow_keys: AllowKeys = None,
    draft: Draft = None,
    draft_tokens: DraftTokens = 8,
    verify: Verify = False,
    verify_window: VerifyWindow = 32,
    adapter: Adapter = None,
    push: Push = True,
) -> None:
    """Interactive multi-turn chat; the conversation's KV cache stays on the nodes between turns."""
    warn_if_insecure(insecure)
    console = Console(highlight=False)
    conversation = [{"role": "system", "content": system}] if system else []
    with (
        user_errors(),
        draft_errors(),
        connect(
            model,
            peers,
            initial_peers,
            identity,
            step_timeout=step_timeout,
            insecure=insecure,
            device=str(_device(device)),
            adapter=adapter,
            push=push,
            draft=draft,
            draft_tokens=draft_tokens,
            **verify_options(verify, verify_window),
            allow_keys=allow_keys_of(allow_keys),
        ) as client,
    ):
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


def api(
    model: Annotated[str, typer.Argument(help="the model the nodes serve ('default', a path, or a hub id)")],
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
    peers: Annotated[str, typer.Option(help="comma-separated node addresses host:port (no DHT)")] = "",
    host: Annotated[str, typer.Option(help="HTTP listen address; 0.0.0.0 exposes the API")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="model id clients ask for [default: MODEL]")] = None,
    context_length: Annotated[
        int | None, typer.Option(min=1, help="prompt + completion limit [default: the model's, at most 2048]")
    ] = None,
    step_timeout: StepTimeout = 30.0,
    identity: Annotated[Path | None, typer.Option(help="client key file")] = None,
    device: HeadDevice = "auto",
    insecure: Insecure = False,
    allow_keys: AllowKeys = None,
    draft: Annotated[str | None, typer.Option(help=DRAFT_HELP + "; the default of every request")] = None,
    draft_tokens: DraftTokens = 8,
    verify: Verify = False,
    verify_window: VerifyWindow = 32,
    adapter: Annotated[
        str | None,
        typer.Option(
            help=ADAPTER_HELP + "; the default of requests whose model is BASE (BASE:ADAPTER picks one per request)"
        ),
    ] = None,
    push: Push = True,
) -> None:
    """Serve an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) over the swarm."""
    warn_if_insecure(insecure)
    if not _peers(peers) and not _peers(initial_peers):
        raise typer.BadParameter(
            "give --initial-peers MULTIADDR (a swarm) or --peers HOST:PORT,...", param_hint="--initial-peers"
        )
    from torchnode.api.runner import run_api

    status = lambda m: err.print(f"[bold green]api[/] {m}", soft_wrap=True)  # noqa: E731
    with (
        user_errors(),
        draft_errors(),
        contextlib.suppress(KeyboardInterrupt),
    ):  # Ctrl-C while the model is still loading
        asyncio.run(
            run_api(
                model,
                _peers(peers),
                _peers(initial_peers),
                host,
                port,
                on_status=status,
                served_name=served_model_name,
                context_length=context_length,
                identity_path=identity,
                step_timeout=step_timeout,
                insecure=insecure,
                device=str(_device(device)),
                adapter=adapter,
                push=push,
                draft=draft,
                draft_tokens=draft_tokens,
                **verify_options(verify, verify_window),
                allow_keys=allow_keys_of(allow_keys),
            )
        )
