"""An in-memory node behind the same `NodeClient` interface as a gRPC node: the real span backend
(node/span_backend.py, real weights, real KV caches), without processes or sockets.

Unit tests drive the client's sessions, routing and failover through these, and inject faults the way
a network does: a node that is down (every call fails), or that dies after a number of steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch

from torchnode.client.discovery import PeerSource
from torchnode.client.session import RetryPolicy
from torchnode.models.checkpoint import Checkpoint
from torchnode.models.families import load_span, num_blocks
from torchnode.models.lora import AdapterBank, find_adapter
from torchnode.node import lora_training
from torchnode.node.errors import RequestError
from torchnode.node.limits import Limits
from torchnode.node.push import PushBox, step_input
from torchnode.node.span_backend import SpanBackend, SpanInfo
from torchnode.protocol.wire.identity import Identity
from torchnode.protocol.wire.node_client import (
    NodeClient,
    NodeError,
    NodeInfo,
    NodeSession,
    PushedStep,
    PushTarget,
    SessionSpec,
)

# the client's retry policy over memory nodes: nothing to wait for, so failover takes milliseconds
FAST_RETRY = RetryPolicy(max_attempts=3, max_seconds=5.0, backoff_initial=0.01, backoff_max=0.05)
CLIENT_KEY = b"client"  # who pushes when the client sends a step's input to a node itself


class MemoryNode(NodeClient):
    network: dict[str, MemoryNode] = {}  # address -> node, for node-to-node push between memory nodes

    def __init__(
        self,
        ckpt: Checkpoint,
        start: int,
        end: int,
        address: str,
        throughput: float = 100.0,
        adapters: Sequence[str] = (),
        dtype: torch.dtype = torch.float32,
        quant: str = "none",
    ):
        """dtype, quant: what the span computes in, as `join --dtype --quant` would load it."""
        span = load_span(ckpt, start, end, dtype, quant)
        blocks = num_blocks(ckpt)
        info = SpanInfo(ckpt.name, ckpt.revision, start, end, blocks, span.config.hidden_size, dtype, quant)
        bank = (
            AdapterBank(span, start, end, [find_adapter(a) for a in adapters]) if adapters else None
        )  # LoRA (--adapters)
        self.backend = SpanBackend(span, info, Limits(), bank)
        self.backend.throughput = throughput
        self.address, self.identity = address, Identity.generate()
        self.down = False
        self.steps_left: int | None = None  # dies after this many more steps (None: never)
        self.steps_served = 0
        self.step_delay = 0.0  # seconds each step sleeps before it runs (a node slower than it announces)
        self.sessions: list[MemorySession] = []
        self.pushes = PushBox()  # node-to-node push: inputs waiting for their steps (node/push.py)
        self.unreachable: set[str] = set()  # addresses this node cannot push to
        self.pushed = 0  # outputs pushed to the next node
        self.infos = 0  # Info calls answered (routing's probes)
        MemoryNode.network[address] = self

    def fail_after(self, steps: int) -> None:
        self.steps_left = steps

    def _check_up(self) -> None:
        if self.steps_left is not None and self.steps_left <= 0:
            self.down = True
        if self.down:
            raise NodeError(self.address, "connection refused", "UNAVAILABLE")

    async def info(self, timeout: float | None = 10.0) -> NodeInfo:
        self._check_up()
        self.infos += 1
        return self.backend.describe(self.identity.public_key)

    def open_session(self, spec: SessionSpec) -> NodeSession:
        session = MemorySession(self, spec)
        self.sessions.append(session)
        return session

    async def close(self) -> None:
        pass

    async def audience(self, timeout: float | None) -> bytes:
        self._check_up()
        return self.identity.public_key

    async def push(self, token: bytes, hidden: torch.Tensor, timeout: float | None) -> None:
        self._check_up()
        self.pushes.deliver(token, CLIENT_KEY, hidden)

    def push_to(self, target: PushTarget, out: torch.Tensor) -> str:
        """Node-to-node push as node/push.py's Pusher does it, minus the network: "" or why not."""
        node = MemoryNode.network.get(target.address)
        if target.address in self.unreachable or node is None or node.down:
            return f"cannot push to {target.address}: connection refused"
        if node.identity.public_key != target.public_key:
            return f"cannot push to {target.address}: another key"
        node.pushes.deliver(target.token, self.identity.public_key, out)
        self.pushed += 1
        return ""

    async def train_forward(self, hidden, start, end, lora, scale, timeout):
        self._check_up()
        return await self._training(lora_training.forward(self.backend, hidden, start, end, lora, scale))

    async def backward(self, hidden, grad_output, start, end, lora, scale, timeout):
        self._check_up()
        return await self._training(lora_training.backward(self.backend, hidden, grad_output, start, end, lora, scale))

    async def _training(self, call):
        try:
            return await call
        except RequestError as e:
            raise NodeError(self.address, str(e), e.status) from None

    def shutdown(self) -> None:
        self.backend.shutdown()


class MemorySession(NodeSession):
    def __init__(self, node: MemoryNode, spec: SessionSpec):
        self.node, self.spec = node, spec
        self.session = None
        self.next_step = 0
        self.positions: list[int] = []  # the position of every step received, for assertions

    async def step(self, hidden: torch.Tensor, position: int, timeout: float | None) -> torch.Tensor:
        return (await self.pushed_step(hidden, position, timeout)).hidden

    async def pushed_step(
        self,
        hidden: torch.Tensor | None,
        position: int,
        timeout: float | None,
        push_to: PushTarget | None = None,
        push_token: bytes = b"",
        push_from: bytes = b"",
    ) -> PushedStep:
        node, s = self.node, self.spec
        node._check_up()
        if node.step_delay:
            await asyncio.sleep(node.step_delay)
        try:
            hidden, digest = await step_input(node.pushes, hidden, push_token, push_from, CLIENT_KEY, timeout or 30.0)
            node._check_up()  # it may have died while waiting
            if self.session is None:
                self.session = node.backend.open_session(
                    s.session_id, s.start, s.end, s.batch_size, s.max_length, s.adapter
                )
            out = await node.backend.step(self.session, self.next_step, hidden.to(s.wire_dtype), position)
        except RequestError as e:
            raise NodeError(node.address, str(e), e.status) from None
        self.next_step += 1
        self.positions.append(position)
        node.steps_served += 1
        if node.steps_left is not None:
            node.steps_left -= 1
        out = out.to(s.wire_dtype)
        return PushedStep(out, node.push_to(push_to, out) if push_to is not None else "", digest)

    def abort(self) -> None:
        self._free()

    async def close(self) -> None:
        self._free()

    def _free(self) -> None:
        if self.session is not None:
            self.node.backend.close_session(self.session)
            self.session = None


class MemoryPeers(PeerSource):
    """A fixed set of in-memory nodes, found and probed like any others."""

    def __init__(self, nodes: Sequence[MemoryNode]):
        super().__init__(Identity.generate())
        self.memory_nodes = list(nodes)

    async def nodes(self, model: str, total_blocks: int) -> list[NodeClient]:
        return list(self.memory_nodes)
