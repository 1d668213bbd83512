"""Commands that generate through a swarm: `generate`, `chat`, `api`.

Each takes the client's flags as one group (`ClientFlags`, torchnode/cli_options.py): peers, keys, and the SDK's
options with the defaults and help client/config.py declares.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .cli_groups import option_groups
from .cli_options import ClientFlags, draft_errors, err, user_errors, warn_if_insecure

Model = Annotated[str, typer.Argument(help="the model the nodes serve ('default', a path, or a hub id)")]


@option_groups
def generate(
    model: Model,
    prompt: Annotated[str, typer.Argument(help="text to continue (or a chat message with --chat)")],
    client: ClientFlags,
    max_new_tokens: Annotated[int, typer.Option(min=0)] = 32,
    greedy: Annotated[bool, typer.Option("--greedy", help="always take the most likely token (default)")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="sampling temperature; 0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the model's chat template")] = False,
) -> None:
    """Generate text through a chain of nodes; tokens stream to stdout."""
    warn_if_insecure(client.insecure)
    if greedy and temperature > 0:
        raise typer.BadParameter("--greedy and --temperature > 0 contradict each other", param_hint="--greedy")
    with user_errors(), draft_errors(), client.connect(model) as sdk:
        pieces = sdk.stream(
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


@option_groups
def chat(
    model: Model,
    client: ClientFlags,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="longest reply")] = 256,
    max_length: Annotated[int, typer.Option(min=16, help="tokens the whole conversation may take")] = 2048,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
) -> None:
    """Interactive multi-turn chat; the conversation's KV cache stays on the nodes between turns."""
    warn_if_insecure(client.insecure)
    console = Console(highlight=False)
    conversation = [{"role": "system", "content": system}] if system else []
    with user_errors(), draft_errors(), client.connect(model) as sdk:
        console.print("[dim]Type a message; an empty line or Ctrl-D ends the chat.[/]")
        with sdk.session(max_length=max_length) as session:
            while True:
                console.print("[bold green]you>[/] ", end="")
                line = sys.stdin.readline()
                if not line.strip():
                    break
                conversation.append({"role": "user", "content": line.strip()})
                console.print("[bold cyan]assistant>[/] ", end="")
                reply = ""
                pieces = session.stream(
                    conversation, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
                )
                for piece in pieces:
                    reply += piece
                    console.print(piece, end="", markup=False)
                console.print()
                conversation.append({"role": "assistant", "content": reply})


@option_groups
def api(
    model: Model,
    client: ClientFlags,
    host: Annotated[str, typer.Option(help="HTTP listen address; 0.0.0.0 exposes the API")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="model id clients ask for [default: MODEL]")] = None,
    context_length: Annotated[
        int | None, typer.Option(min=1, help="prompt + completion limit [default: the model's, at most 2048]")
    ] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            help="key /v1/* requests must give as 'Authorization: Bearer KEY' (repeatable); keys in "
            "$TORCHNODE_API_KEY (separated by spaces) and --api-key-file are added [default: none, the API is open]",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="file of API keys, one per line ('#' starts a comment); adds to --api-key")
    ] = None,
) -> None:
    """Serve an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) and a chat page
    (/chat) over the swarm."""
    warn_if_insecure(client.insecure)
    peers, initial_peers = client.peer_lists()
    from torchnode.api.auth import ApiKeyError, ApiKeys, keys_from_environment, read_key_file
    from torchnode.api.runner import run_api

    try:
        from_file = read_key_file(api_key_file) if api_key_file else []
        keys = ApiKeys([*(api_key or ()), *keys_from_environment(), *from_file])
    except ApiKeyError as e:
        raise typer.BadParameter(str(e), param_hint="--api-key-file" if api_key_file else "--api-key") from None
    if not keys and host not in ("127.0.0.1", "::1", "localhost"):
        err.print(f"[yellow]warning:[/] the API listens on {host} with no --api-key: anyone who reaches it can use it")

    status = lambda m: err.print(f"[bold green]api[/] {m}", soft_wrap=True)  # noqa: E731
    with user_errors(), draft_errors(), contextlib.suppress(KeyboardInterrupt):  # Ctrl-C while the model loads
        options = client.sdk_options()
        asyncio.run(
            run_api(
                model,
                peers,
                initial_peers,
                host,
                port,
                on_status=status,
                served_name=served_model_name,
                context_length=context_length,
                api_keys=keys,
                **options,
            )
        )
