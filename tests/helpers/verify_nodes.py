"""Swarms of honest and dishonest in-memory nodes for --verify tests, and clients that verify them.

Each helper appends to `pool` (the `memory_pool` fixture of tests/conftest.py, which shuts them down)."""

from __future__ import annotations

from dishonest_node import dishonest_memory_node
from memory_node import FAST_RETRY, MemoryNode, MemoryPeers

from torchnode.client.model import AsyncDistributedModel

WINDOW = 16  # the verification window of `model_over`: longer than the tests' prompts, so tokens wait for it


def honest(pool: list, ckpt, start: int, end: int, address: str, throughput: float = 100.0, adapters=()):
    """An in-memory node; `adapters`: LoRA adapter directories it serves."""
    pool.append(MemoryNode(ckpt, start, end, address, throughput, adapters=[str(p) for p in adapters]))
    return pool[-1]


def liar(pool: list, ckpt, start: int, end: int, address: str, mode: str, throughput: float = 10_000.0, adapters=()):
    """A liar that routing prefers (fast), so it sits in the main chain unless told otherwise; it lies on
    sessions with one of its `adapters` too."""
    pool.append(dishonest_memory_node(ckpt, start, end, address, mode, adapters=[str(p) for p in adapters]))
    pool[-1].backend.throughput = throughput
    return pool[-1]


def model_over(ckpt, pool: list, **kwargs) -> AsyncDistributedModel:
    """A client of `pool` that verifies with a window of WINDOW tokens (override with keywords)."""
    kwargs = {"verify": True, "verify_window": WINDOW, **kwargs}
    return AsyncDistributedModel(ckpt, MemoryPeers(pool), step_timeout=5.0, retry=FAST_RETRY, **kwargs)


def named(caplog, node) -> bool:
    """Whether the client's log named `node` dishonest, with its address and its peer id."""
    peer = node.identity.peer_id
    return any("dishonest" in r.message and node.address in r.message and peer in r.message for r in caplog.records)
