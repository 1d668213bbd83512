"""The one way to talk to a node: `NodeClient` (Info, sessions) and `NodeSession` (steps).

This interface is all that routing, sessions, discovery and the health monitor see. `grpc_node.py` is
its network implementation, and protobuf and gRPC stay inside that file (exo's peer handle does the
same); tests put an in-memory node behind the same interface.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..version import UNSAID_PROTOCOL

DEFAULT_PROBE_TIMEOUT = 5.0


class NodeError(Exception):
    """A node failed or refused a call. `status` is the gRPC status name ("UNAVAILABLE", ...), or None
    when the node answered but the answer was wrong (a bad signature, a reply to another step)."""

    def __init__(self, address: str, message: str, status: str | None = None):
        super().__init__(f"{address}: {message}")
        self.address, self.status = address, status


@dataclass(frozen=True)
class NodeInfo:
    """What a node says about itself; field names are those of the `InfoResponse` message."""

    model: str
    revision: str
    start_block: int
    end_block: int
    total_blocks: int
    hidden_size: int
    dtype: str
    throughput: float
    cache_bytes_free: int
    sessions_free: int
    version: str
    public_key: bytes
    max_message_bytes: int = 0
    batch_size: int = 0  # sequences in the node's latest batch (0: idle)
    queue_length: int = 0  # steps waiting for the next batch
    adapters: tuple[str, ...] = ()  # names of the LoRA adapters the node serves
    protocol: str = UNSAID_PROTOCOL  # protocol version "MAJOR.MINOR" (protocol/version.py)
    asyncio_tasks: int = 0  # tasks alive in the node's event loop (scripts/soak.py watches it for leaks)
    quant: str = ""  # weight quantization: "none", "int8", "int4", "nf4" ("": a node too old to say; none)
    batches_run: int = 0  # passes over the span since the node started
    sequences_run: int = 0  # sequences in those passes, summed (their change over batches_run's: the mean batch)


@dataclass(frozen=True)
class SessionSpec:
    """What opening a session asks of a node: its id, blocks, KV cache size, batch, reply dtype and adapter."""

    session_id: str
    start: int
    end: int
    max_length: int
    batch_size: int = 1
    wire_dtype: torch.dtype = torch.float32
    adapter: str = ""  # a LoRA adapter the node serves, applied to this session (empty: the base model)
    batched: bool = True  # its steps may share one message per round with the client's other sessions' (StepBatches)


@dataclass(frozen=True)
class PushTarget:
    """Node-to-node push: where a node sends its step's output next, and the token that node waits for."""

    address: str
    public_key: bytes
    token: bytes  # 16 random bytes the client picks for this step and hop


@dataclass(frozen=True)
class PushedStep:
    """The reply to a step of a pushed chain: the node's output (the client's copy) and how the push went."""

    hidden: torch.Tensor
    push_error: str = ""  # the output could not be pushed on: the client must send it to the next node itself
    input_digest: bytes = b""  # tensor_digest of the input the node received by push (b"": not pushed)


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """sha256 of a tensor's dtype, shape and bytes: a node that got its input by push names what it got, so
    the client can check that the previous node pushed what it returned to the client."""
    h = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


class NodeSession(ABC):
    """One inference session on one node; steps run in order, the node keeps the KV cache."""

    def keep_exchanges(self) -> None:
        """From now on keep every signed (request, reply) of the stream until `take_exchanges` (a fraud proof's
        parts: --verify). A session that signs nothing (an in-process node) keeps nothing."""
        return None

    def take_exchanges(self) -> list[tuple[bytes, bytes]]:
        """The signed (request, reply) pairs kept since the last call, serialized, in step order."""
        return []

    @abstractmethod
    async def step(self, hidden: torch.Tensor, position: int, timeout: float | None) -> torch.Tensor:
        """Runs hidden states (B, T, H) of tokens at `position` (<= cached length; less rewinds)."""

    async def pushed_step(
        self,
        hidden: torch.Tensor | None,
        position: int,
        timeout: float | None,
        push_to: PushTarget | None = None,
        push_token: bytes = b"",
        push_from: bytes = b"",
    ) -> PushedStep:
        """A step of a pushed chain: its input is `hidden`, or (hidden None) arrives by a Push carrying
        `push_token` from the node with key `push_from` or from this client; the output also goes to `push_to`."""
        raise NotImplementedError(f"{type(self).__name__} does not push")

    @abstractmethod
    def abort(self) -> None:
        """Drops the session now, without waiting for the node (it failed, or is being replaced)."""

    @abstractmethod
    async def close(self) -> None:
        """Ends the session politely: the node frees its cache."""


class NodeClient(ABC):
    address: str
    encrypted: bool | None = None  # whether the link is encrypted (TLS); None: not known (not reached yet)

    @abstractmethod
    async def info(self, timeout: float | None = 10.0) -> NodeInfo: ...

    @abstractmethod
    def open_session(self, spec: SessionSpec) -> NodeSession:
        """A session that opens on the node with its first step (no round trip of its own)."""

    @abstractmethod
    async def close(self) -> None: ...

    async def audience(self, timeout: float | None) -> bytes:
        """The node's public key (what requests are addressed to, and push targets name)."""
        raise NotImplementedError(f"{type(self).__name__} does not push")

    async def push(self, token: bytes, hidden: torch.Tensor, timeout: float | None) -> None:
        """Sends a pushed step's input (B, T, H) to this node: it waits for it under `token`."""
        raise NotImplementedError(f"{type(self).__name__} does not push")

    async def train_forward(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        lora: dict[str, torch.Tensor],
        scale: float,
        timeout: float | None,
    ) -> torch.Tensor:
        """Blocks [start, end) over hidden (B, T, H) from position 0 with the caller's LoRA weights
        ({"layers.N.module.lora_A" | "...lora_B": tensor}, term scaled by `scale`); nothing is kept."""
        raise NotImplementedError(f"{type(self).__name__} does not train")

    async def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        start: int,
        end: int,
        lora: dict[str, torch.Tensor],
        scale: float,
        timeout: float | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(d loss / d hidden, {LoRA name: d loss / d it}) given d loss / d outputs of `train_forward`'s pass."""
        raise NotImplementedError(f"{type(self).__name__} does not train")


@dataclass(frozen=True)
class Probe:
    info: NodeInfo | None  # None when the call failed
    rtt: float | None  # seconds
    error: NodeError | None


async def probe(node: NodeClient, timeout: float = DEFAULT_PROBE_TIMEOUT) -> Probe:
    """A signed Info call and its round trip: proves the node holds its key, tells its span and load.

    On first contact (the link not set up yet: `encrypted` unknown) a second call is the one timed: the first
    one's time is mostly the connection's and TLS's set-up, and the round trip decides whether pushing into
    the node pays (client/session.py)."""
    started, first_contact = time.perf_counter(), node.encrypted is None
    try:
        info = await node.info(timeout=timeout)
        if first_contact:
            started = time.perf_counter()
            info = await node.info(timeout=timeout)
    except NodeError as e:
        return Probe(None, None, e)
    except Exception as e:  # whatever else a hostile or broken address causes: this node only
        return Probe(None, None, NodeError(node.address, repr(e)))
    return Probe(info, time.perf_counter() - started, None)
