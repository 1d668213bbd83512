"""`torchnode api`: load the model, serve the OpenAI API until SIGINT/SIGTERM, close the model.

Binding, signals and the bounded shutdown are protocol/serving.py's, as for every server the CLI starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..client.model import AsyncDistributedModel
from ..protocol.serving import bind_tcp, bounded, serve_http, until_signal, url_of
from .app import create_app
from .auth import ApiKeys


async def run_api(
    model: str,
    peers: Sequence[str] = (),
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 8000,
    on_status: Callable[[str], None] = print,
    *,
    served_name: str | None = None,
    context_length: int | None = None,
    api_keys: ApiKeys | None = None,
    **model_kwargs,
) -> None:
    """Serves the OpenAI API until SIGINT or SIGTERM; model_kwargs go to AsyncDistributedModel.from_pretrained
    (identity_path, expected_keys, wire_dtype, step_timeout). Port 0 picks a free port (named in the ready line).
    api_keys: keys /v1/* requests must present (none: open)."""
    sock = bind_tcp(host, port, "the OpenAI API")  # before loading anything, so a port in use fails at once
    name = served_name or model
    try:
        on_status("loading the model's head and tokenizer, finding nodes")
        core = await AsyncDistributedModel.from_pretrained(model, peers, initial_peers, **model_kwargs)

        def ready() -> None:
            locked = f", {len(api_keys.keys)} API key(s) required" if api_keys else ""
            on_status(
                f"ready: OpenAI API at {url_of(sock, '/v1')} serving model {name!r}, chat page at "
                f"{url_of(sock, '/chat')}{locked}"
            )

        try:
            await serve_http(create_app(core, name, context_length, api_keys), sock, until_signal(), ready)
        finally:
            await bounded(core.close(), "closing the model's peer source")
    finally:
        sock.close()
