"""Who recomputes a span for the verifier (client/verification/verifier.py): another node's session over the same
blocks (`RemoteOpinion`), or the client's own copy of them (`LocalOpinion`), each with the session's LoRA
adapter applied when it has one, since a check against the base model would compare two different models.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path

import torch

from ...models import torch_threads
from ...models.checkpoint import Checkpoint
from ...models.families import LAYER_PREFIX, load_span
from ...models.lora import AdapterBank, AdapterError, AdapterSource, Lora, find_adapter, lora_pass
from ...protocol.wire.node_client import NodeClient
from ..precision import Precision
from ..session import InferenceSession

log = logging.getLogger(__name__)


def holds_blocks(ckpt: Checkpoint) -> bool:
    """Whether the client's checkpoint has the blocks' weights on disk (then it can be its own judge)."""
    try:
        return ckpt.parameter_count(lambda key: key.startswith(LAYER_PREFIX)) > 0
    except (OSError, ValueError):
        return False


def adapter_files(adapter: str, fetch: bool = False) -> AdapterSource | None:
    """The files of the adapter a client names, when it has them: a directory (nodes know that adapter by its
    base name, as `join --adapters` names it) or, with `fetch`, a hub id. None otherwise: the client then
    cannot recompute the adapter's blocks itself. A bad directory raises AdapterError, as for a node."""
    if Path(adapter).expanduser().is_dir():
        return find_adapter(adapter)
    if fetch and adapter.count("/") == 1 and not adapter.startswith((".", "/", "~")):
        return _hub_adapter(adapter)
    return None


@functools.lru_cache(maxsize=16)
def _hub_adapter(hub_id: str) -> AdapterSource | None:
    """A hub adapter's files, fetched once per process (not once per session); None when they cannot be."""
    try:
        return find_adapter(hub_id)
    except AdapterError as e:
        log.warning("verification: no local copy of adapter %r, so only other nodes can check it: %s", hub_id, e)
        return None


def run_span(
    span: torch.nn.Module, lora: Lora | None, x: torch.Tensor, position: int, start: int, end: int, caches
) -> torch.Tensor:
    """Blocks [start, end) of `span` over x (B, T, H) with `lora` applied to every row (None: the base model)."""
    with lora_pass([x.shape[0] * x.shape[1]], [lora]):
        return span(x, position, start, end, caches)


# ---- opinions: who recomputes a span


class Opinion:
    """Someone else's run of blocks [start, end) over the same inputs. It keeps its KV cache between
    checks, so each check sends only the new window, as one prefill."""

    trusted = False  # the client's own computation decides alone

    @property
    def name(self) -> str:
        """Who holds this opinion, for messages."""
        return ""

    def __init__(self, precisions: list[Precision]):
        self.precisions = precisions  # of every node it runs on (one quantization: routing picks them so)
        self.valid, self.lock = 0, asyncio.Lock()  # valid: positions it holds that still stand

    async def outputs(self, inputs: torch.Tensor, start: int) -> torch.Tensor:
        """Outputs (B, L - start, H) at positions [start, L) of inputs (B, L, H)."""
        async with self.lock:
            sent = min(self.valid, start)
            out = await self._run(inputs[:, sent:], sent)
            self.valid = inputs.shape[1]
            return out[:, start - sent :]

    def forget_from(self, position: int) -> None:
        self.valid = min(self.valid, position)

    async def _run(self, x: torch.Tensor, position: int) -> torch.Tensor:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class RemoteOpinion(Opinion):
    """An ordinary inference session on other nodes: to them, a client prefilling W tokens at a time."""

    def __init__(self, session: InferenceSession, precisions: list[Precision]):
        super().__init__(precisions)
        self.session = session

    @property
    def nodes(self) -> list[NodeClient]:
        return [hop.node for hop in self.session.hops]

    @property
    def name(self) -> str:
        return ", ".join(node.address for node in self.nodes)

    async def _run(self, x: torch.Tensor, position: int) -> torch.Tensor:
        return await self.session.step(x, position)

    async def close(self) -> None:
        await self.session.close()


class LocalOpinion(Opinion):
    """The client's own copy of the blocks (read from its local checkpoint on first need), in float32, with
    the session's adapter applied (only its blocks' LoRA tensors are read, as a node does), and its weights
    quantized as `quant` says: a node with int8 weights is judged by the same int8 weights
    (models/quantization.py rounds a checkpoint the same way wherever it runs)."""

    trusted = True

    def __init__(
        self,
        ckpt: Checkpoint,
        start: int,
        end: int,
        batch: int,
        max_length: int,
        adapter: AdapterSource | None = None,
        quant: str = "none",
    ):
        super().__init__([Precision("float32", quant)])
        self.quant = quant
        self.span = load_span(ckpt, start, end, torch.float32, quant)
        self.start, self.end = start, end
        self.lora = AdapterBank(self.span, start, end, [adapter]).get(adapter.name) if adapter is not None else None
        self.caches = self.span.new_caches(start, end, batch, max_length)

    @property
    def name(self) -> str:
        return "this client" if self.quant == "none" else f"this client (with {self.quant} weights)"

    async def _run(self, x: torch.Tensor, position: int) -> torch.Tensor:
        x = x.to(torch.float32)
        return await torch_threads.on_compute_thread(
            run_span, self.span, self.lora, x, position, self.start, self.end, self.caches
        )
