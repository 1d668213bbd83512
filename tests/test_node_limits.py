"""Every node limit, hit for real: each refusal has its status and a message naming the flag."""

from __future__ import annotations

import asyncio

import psutil
import pytest
import torch
from swarm import start_node

from torchnode.protocol.wire.grpc_node import GrpcNodeClient as NodeClient
from torchnode.protocol.wire.identity import Identity
from torchnode.protocol.wire.node_client import NodeError, SessionSpec

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

TINY_HIDDEN = 64
# tiny llama, blocks 0:2, fp32: 2 layers x (k, v) x 2 KV heads x 16 dims x 4 bytes = 512 bytes per token
TINY_BYTES_PER_TOKEN = 512


async def open_session(
    client: NodeClient, name: str, max_length: int, end: int = 2, tokens: int = 1, hidden: int = TINY_HIDDEN
):
    stream = client.open_session(SessionSpec(name, 0, end, max_length))
    await stream.step(torch.randn(1, tokens, hidden), 0, 30)
    return stream


def test_max_sessions_and_cache_memory(tiny_llama):
    node = start_node(str(tiny_llama), "--blocks", "0:2", "--max-sessions", "2", "--cache-memory", f"{100 * 1024}B")

    async def scenario():
        client = NodeClient(node.address, Identity.generate())
        first = await open_session(client, "a", 128)  # 64 KiB of the 100 KiB budget
        with pytest.raises(NodeError, match="--cache-memory") as info:
            await open_session(client, "b", 128)  # another 64 KiB does not fit
        assert info.value.status == "RESOURCE_EXHAUSTED"
        second = await open_session(client, "c", 32)
        with pytest.raises(NodeError, match="--max-sessions") as info:
            await open_session(client, "d", 8)  # a third session
        assert info.value.status == "RESOURCE_EXHAUSTED"
        await first.close()
        await second.close()
        for _ in range(50):  # closing frees the budget and the slots
            status = await client.info()
            if status.sessions_free == 2:
                break
            await asyncio.sleep(0.1)
        assert status.cache_bytes_free == 100 * 1024 and status.sessions_free == 2
        again = await open_session(client, "e", 128)
        await again.close()
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        node.stop()


def test_idle_session_is_closed_and_freed(tiny_llama):
    node = start_node(str(tiny_llama), "--blocks", "0:2", "--session-timeout", "1")

    async def scenario():
        client = NodeClient(node.address, Identity.generate())
        stream = await open_session(client, "idle", 64)
        assert (await client.info()).sessions_free == 63
        await asyncio.sleep(2.0)  # longer than --session-timeout
        with pytest.raises(NodeError, match="--session-timeout") as info:
            await stream.step(torch.randn(1, 1, TINY_HIDDEN), 1, 10)
        assert info.value.status == "DEADLINE_EXCEEDED"
        status = await client.info()
        assert status.sessions_free == 64 and status.cache_bytes_free == 1 << 30
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        node.stop()


RSS_SLACK = 96 << 20  # gRPC streams, Python objects, allocator slack


def test_rss_stays_within_cache_budget_under_50_sessions():
    budget = 256 << 20
    node = start_node("default", "--blocks", "0:15", "--cache-memory", "256MiB")
    process = psutil.Process(node.proc.pid)

    async def scenario():
        client = NodeClient(node.address, Identity.generate())
        rss_before = process.memory_info().rss
        results = await asyncio.gather(
            *(open_session(client, f"s{i}", 256, end=15, tokens=32, hidden=576) for i in range(50)),
            return_exceptions=True,
        )
        opened = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, NodeError)]
        assert len(opened) + len(refused) == 50, [
            r for r in results if isinstance(r, Exception) and not isinstance(r, NodeError)
        ]
        assert refused and all(r.status == "RESOURCE_EXHAUSTED" for r in refused)
        rss_peak = process.memory_info().rss
        info = await client.info()
        for stream in opened:
            await stream.close()
        await asyncio.sleep(0.5)
        freed = await client.info()
        await client.close()
        return rss_before, rss_peak, len(opened), info, freed

    try:
        rss_before, rss_peak, opened, info, freed = asyncio.run(scenario())
    finally:
        node.stop()
    per_session = 15 * 2 * 3 * 256 * 64 * 4  # layers x (k, v) x KV heads x tokens x head dim x fp32
    assert opened == budget // per_session  # exactly as many as the budget holds
    assert info.cache_bytes_free == budget - opened * per_session
    assert freed.cache_bytes_free == budget
    growth = rss_peak - rss_before
    print(f"{opened} sessions open: RSS grew {growth / 2**20:.1f} MiB for a {budget / 2**20:.0f} MiB budget")
    assert growth < budget + RSS_SLACK
