"""Node-to-node push: a node sends its step's output straight to the next node of the client's chain.

Per token the client then waits for hops + 1 one-way legs (client -> A -> B -> client) instead of
2 x hops. The client still has a stream to every hop and gets every hop's output (the copy it keeps for
replay and verification); only the *input* of a step on the next node comes by push:

- the client sends node A a step with `push_to` (B's address, key and a random token), and node B a step
  with `push_token` (and `push_from`, A's key) and no hidden states, both at once;
- A computes, writes its output to B on a signed Push stream (A is B's client: TLS pinned to B's key,
  the Push addressed to B, signed by A) and replies to the client; if it could not push, its reply says
  so (`push_error`) and the client pushes the copy to B itself;
- B takes the input pushed under the token by A or by the session's own client (anyone else's is
  ignored), names its digest in its reply (so the client checks that A pushed what it returned), computes,
  and pushes on or replies.

`PushBox` is the receiving side (inputs waiting for their steps, or steps waiting for their inputs),
`Pusher` the sending side (one Push stream per next node, shared by all sessions). Neither knows gRPC:
the links are `GrpcNodeClient`s (protocol/wire/grpc_node.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..protocol.wire.grpc_node import GrpcNodeClient
from ..protocol.wire.identity import Identity
from ..protocol.wire.node_client import NodeClient, NodeError, PushTarget, tensor_digest
from .errors import RequestError

DEFAULT_MAX_WAITING = 4096  # pushed inputs kept for steps that have not arrived yet
DEFAULT_PUSH_TTL = 60.0  # seconds a pushed input waits for its step
DEFAULT_PUSH_TIMEOUT = 5.0  # seconds to open a Push stream to the next node (TLS included) and write to it


class PushTimeout(RequestError):
    status = "DEADLINE_EXCEEDED"


@dataclass
class _Slot:
    inputs: dict[bytes, torch.Tensor]  # pusher's key -> its input
    arrived: asyncio.Event
    expires: float


class PushBox:
    """Pushed inputs by token, until the step that names the token takes one from an allowed sender."""

    def __init__(self, max_waiting: int = DEFAULT_MAX_WAITING, ttl: float = DEFAULT_PUSH_TTL):
        self.max_waiting, self.ttl = max_waiting, ttl
        self._slots: OrderedDict[bytes, _Slot] = OrderedDict()

    def _slot(self, token: bytes) -> _Slot:
        now = time.monotonic()
        while self._slots and (len(self._slots) >= self.max_waiting or next(iter(self._slots.values())).expires < now):
            self._slots.popitem(last=False)  # oldest first: expired, or over the bound
        if token not in self._slots:
            self._slots[token] = _Slot({}, asyncio.Event(), now + self.ttl)
        return self._slots[token]

    def deliver(self, token: bytes, sender: bytes, hidden: torch.Tensor) -> None:
        slot = self._slot(token)
        slot.inputs.setdefault(sender, hidden)
        slot.arrived.set()

    async def receive(self, token: bytes, senders: list[bytes], timeout: float) -> torch.Tensor:
        """The input pushed under `token` by one of `senders` (the session's client first, then the previous
        node: a client that sends an input itself has replaced the previous node)."""
        slot = self._slot(token)
        deadline = time.monotonic() + timeout
        try:
            while not (found := [slot.inputs[k] for k in senders if k in slot.inputs]):
                slot.arrived.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait_for(slot.arrived.wait(), left)
        except TimeoutError:
            raise PushTimeout(f"no pushed input for this step within {timeout:.0f}s (--session-timeout)") from None
        finally:
            self._slots.pop(token, None)
        return found[0]


class Pusher:
    """This node's links to the next nodes of chains: one client (channel + Push stream) per (address, key)."""

    def __init__(self, identity: Identity, insecure: bool = False, timeout: float = DEFAULT_PUSH_TIMEOUT):
        self.identity, self.insecure, self.timeout = identity, insecure, timeout
        self.links: dict[tuple[str, bytes], NodeClient] = {}

    def link(self, address: str, key: bytes) -> NodeClient:
        if (address, key) not in self.links:
            self.links[(address, key)] = GrpcNodeClient(
                address, self.identity, expected_key=key, insecure=self.insecure
            )
        return self.links[(address, key)]

    async def push(self, target: PushTarget, hidden: torch.Tensor) -> str:
        """Sends `hidden` to `target`; returns "" or why it could not (the client then sends it itself)."""
        if len(target.token) != 16 or len(target.public_key) != 32:
            return "push_to needs a 16-byte token and the next node's 32-byte key"
        try:
            await self.link(target.address, target.public_key).push(target.token, hidden, self.timeout)
        except NodeError as e:
            return f"cannot push to {target.address}: {e}"
        return ""

    async def close(self) -> None:
        for link in self.links.values():
            await link.close()


async def step_input(
    box: PushBox, hidden: torch.Tensor | None, token: bytes, upstream: bytes, client: bytes, timeout: float
) -> tuple[torch.Tensor | None, bytes]:
    """A step's input: its own hidden states, or (with a token) the one pushed for it; and the pushed one's digest."""
    if not token:
        return hidden, b""
    if hidden is not None:
        raise RequestError("a step carries either hidden states or a push_token, not both")
    x = await box.receive(token, [k for k in (client, upstream) if k], timeout)
    return x, tensor_digest(x)
