"""An inference session over a chain of hops: one Inference stream per node, KV caches on the nodes.

The session keeps, for each hop, the inputs it sent (the hop's history), so that a replacement node can
rebuild the failed node's KV cache by replaying them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch

from ..protocol import tensor_codec
from ..protocol import torchnode_pb2 as pb
from .transport import HopStream, NodeClient

DEFAULT_STEP_TIMEOUT = 30.0


@dataclass
class Hop:
    node: NodeClient
    start: int
    end: int
    stream: HopStream | None = None
    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (position, inputs) sent so far


class InferenceSession:
    def __init__(
        self,
        hops: list[Hop],
        max_length: int,
        batch_size: int = 1,
        wire_dtype: torch.dtype = torch.float32,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
    ):
        self.hops, self.max_length, self.batch_size = hops, max_length, batch_size
        self.wire_dtype, self.step_timeout = wire_dtype, step_timeout
        self.id = uuid.uuid4().hex
        self.position = 0  # tokens processed so far

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Sends hidden states (B, T, H) of tokens at `position` (default: next) through every hop."""
        position = self.position if position is None else position
        if position + hidden.shape[1] > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded at position {position}")
        for hop in self.hops:
            hop.history = [(p, h) for p, h in hop.history if p < position]  # a rewind forgets the future
            hop.history.append((position, hidden))
            hidden = await self._send(hop, hidden, position)
        self.position = position + hidden.shape[1]
        return hidden

    async def _send(self, hop: Hop, hidden: torch.Tensor, position: int) -> torch.Tensor:
        request = pb.Step(session_id=self.id, position=position)
        request.hidden.CopyFrom(tensor_codec.encode(hidden, self.wire_dtype))
        if hop.stream is None:
            hop.stream = hop.node.open_stream()
            request.max_length, request.batch_size = self.max_length, self.batch_size
            request.start_block, request.end_block = hop.start, hop.end
        out, _ = await hop.stream.step(request, self.wire_dtype, self.step_timeout)
        return out

    async def close(self) -> None:
        for hop in self.hops:
            if hop.stream is not None:
                await hop.stream.close()
                hop.stream = None
