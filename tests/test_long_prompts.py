"""A prompt that does not fit a node: the node answers with a gRPC status naming the limit, and the client
passes that on (an error naming the flag), instead of hanging or retrying for ever."""

from __future__ import annotations

import asyncio

import pytest
import torch
from swarm import run_cli, start_node

from torchnode.client.sync_model import DistributedModel
from torchnode.protocol.wire.grpc_node import GrpcNodeClient as NodeClient
from torchnode.protocol.wire.identity import Identity
from torchnode.protocol.wire.node_client import NodeError, SessionSpec

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

LONG = torch.arange(3, 203)[None] % 500  # 200 tokens


def test_a_prompt_longer_than_a_node_allows_is_a_clear_status_and_error(tiny_llama):
    node = start_node(str(tiny_llama), "--blocks", "0:4", "--max-session-tokens", "128", "--cache-memory", "8MiB")

    async def statuses():
        client = NodeClient(node.address, Identity.generate())
        with pytest.raises(NodeError, match="--max-session-tokens") as info:
            stream = client.open_session(SessionSpec("long", 0, 4, 216))
            await stream.step(torch.randn(1, 200, 64), 0, 30)
        assert info.value.status == "OUT_OF_RANGE"
        await client.close()

    try:
        asyncio.run(statuses())
        with DistributedModel.from_pretrained(str(tiny_llama), [node.address], step_timeout=10) as model:
            with pytest.raises(Exception, match="--max-session-tokens"):
                model.generate(LONG, max_new_tokens=16)
        result = run_cli("generate", str(tiny_llama), "word " * 150, "--peers", node.address, "--step-timeout", "10")
        assert result.returncode == 1 and "--max-session-tokens" in result.stderr and "Traceback" not in result.stderr
    finally:
        node.stop()


def test_a_prompt_whose_kv_cache_exceeds_the_budget_is_resource_exhausted(tiny_llama):
    node = start_node(str(tiny_llama), "--blocks", "0:4", "--max-session-tokens", "4096", "--cache-memory", "64KiB")

    async def statuses():
        client = NodeClient(node.address, Identity.generate())
        with pytest.raises(NodeError, match="--cache-memory") as info:
            stream = client.open_session(SessionSpec("long", 0, 4, 216))
            await stream.step(torch.randn(1, 200, 64), 0, 30)
        assert info.value.status == "RESOURCE_EXHAUSTED"
        await client.close()

    try:
        asyncio.run(statuses())
    finally:
        node.stop()
