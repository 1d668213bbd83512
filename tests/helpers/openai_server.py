"""An OpenAI-compatible API app (torchnode.api) served by uvicorn on 127.0.0.1 over a client of real nodes."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future

import uvicorn
from swarm import free_port

from torchnode import AsyncDistributedModel
from torchnode.api import create_app
from torchnode.client.loop_thread import LoopThread

NAME = "tiny-llama"  # the model name the API serves the tiny llama under


class Api:
    """Apps served by uvicorn on 127.0.0.1, on the client loop thread that owns the model's channels."""

    def __init__(self, tiny_llama, nodes):
        self.loop = LoopThread()
        peers = [n.address for n in nodes]
        self.model = self.loop.run(AsyncDistributedModel.from_pretrained(str(tiny_llama), peers=peers))
        self.servers: list[tuple[uvicorn.Server, Future]] = []
        self.url = self.serve()

    def serve(self, **app_kwargs) -> str:
        port = free_port()
        app = create_app(self.model, NAME, **app_kwargs)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        serving = asyncio.run_coroutine_threadsafe(server.serve(), self.loop.loop)
        self.servers.append((server, serving))
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and not serving.done(), "the API did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        for server, _ in self.servers:
            server.should_exit = True
        for _, serving in self.servers:
            serving.result(timeout=30)
        self.loop.run(self.model.close())
        self.loop.stop()
