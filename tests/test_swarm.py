"""The swarm: nodes choose spans through the DHT, clients find routes, dead nodes vanish, leavers drain."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch
from greedy import STORY, chat_ids, hf_greedy
from swarm import run_cli, start_coordinator, start_node, stop_all
from transformers import AutoModelForCausalLM

from torchnode.client.sampling import SamplingParams
from torchnode.client.sync_model import DistributedModel
from torchnode.protocol.dht.network import find_servers, start_dht

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

EXPIRATION = 8.0  # seconds; short so that a killed node's records vanish quickly


def spans_of(nodes) -> list[tuple[int, int]]:
    return [(n.start, n.end) for n in nodes]


@pytest.fixture
def coordinator():
    proc, maddr = start_coordinator()
    yield maddr
    proc.stop()


def join(model: str, maddr: str, *args: str):
    return start_node(model, "--initial-peers", maddr, "--expiration", str(EXPIRATION), *args)


def test_tiny_swarm_chooses_spans_and_generates(coordinator, tiny_llama):
    nodes = []
    try:
        for _ in range(3):
            nodes.append(join(str(tiny_llama), coordinator, "--num-blocks", "2"))
        assert spans_of(nodes)[:2] == [(0, 2), (2, 4)]  # the second node fills the gap the first left
        covered = {b for n in nodes for b in range(n.start, n.end)}
        assert covered == set(range(4))

        hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        ids = torch.tensor([[1, 5, 9, 14, 3, 27]])
        with DistributedModel.from_pretrained(str(tiny_llama), initial_peers=[coordinator]) as model:
            assert model.generate(ids, max_new_tokens=32).tolist() == hf_greedy(hf, ids, 32).tolist()

        result = run_cli("swarm", str(tiny_llama), "--initial-peers", coordinator)
        assert result.returncode == 0, result.stderr
        assert "all 4 blocks covered" in result.stdout
        for n in nodes:
            assert n.peer_id[:12] in result.stdout
    finally:
        stop_all(nodes)


def test_cli_refuses_to_generate_without_peers(tiny_llama):
    result = run_cli("generate", str(tiny_llama), "hello")
    assert result.returncode != 0
    assert "--initial-peers" in result.stderr or "--peers" in result.stderr


def wait_gone(maddr: str, model: str, total: int, peer_id: str, timeout: float) -> float:
    dht = start_dht([maddr], client_mode=True)
    try:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            servers = find_servers(dht, model, total)
            if all(r.peer_id != peer_id for rs in servers.values() for r in rs):
                return time.monotonic() - started
            time.sleep(0.5)
        raise AssertionError(f"records of {peer_id} still in the DHT after {timeout}s")
    finally:
        dht.shutdown()


def test_default_swarm_weakest_span_kill_and_drain(coordinator, default_reference):
    hf, tokenizer = default_reference
    ids = chat_ids(tokenizer, STORY)
    expected = hf_greedy(hf, ids, 40)
    nodes = []
    try:
        # A serves everything; B, C, D each take the weakest 10-block window in turn.
        nodes.append(join("default", coordinator, "--num-blocks", "30"))
        for _ in range(2):
            nodes.append(join("default", coordinator, "--num-blocks", "10"))
        assert spans_of(nodes) == [(0, 30), (0, 10), (10, 20)]
        with DistributedModel.from_pretrained("default", initial_peers=[coordinator]) as model:
            assert model.generate(ids, max_new_tokens=40).tolist() == expected.tolist()

        nodes.append(join("default", coordinator, "--num-blocks", "10"))
        assert spans_of(nodes)[3] == (20, 30), "the 4th node must take the weakest span"

        # SIGKILL B: its records vanish within the expiration; A's replica serves its blocks.
        killed = nodes[1]
        killed.stop(signal.SIGKILL)
        gone_after = wait_gone(coordinator, "SmolLM2-135M-Instruct", 30, killed.peer_id, 4 * EXPIRATION)
        assert gone_after <= EXPIRATION + 5, f"records outlived their {EXPIRATION} s expiration: {gone_after:.1f} s"
        with DistributedModel.from_pretrained("default", initial_peers=[coordinator]) as model:
            assert model.generate(ids, max_new_tokens=40).tolist() == expected.tolist()

            # SIGTERM a node of the route mid-generation: it drains, the generation completes.
            core, loop = model.async_model, model
            session = loop.run(core.open_session(ids.shape[1] + 40))
            victim_address = session.hops[0].node.address
            victim = next(n for n in nodes if n.address == victim_address)
            tokens = []
            for new in loop.iterate(core.generate_ids(ids, SamplingParams(max_new_tokens=40), session)):
                tokens.append(int(new[0]))
                if len(tokens) == 3:
                    threading.Thread(target=victim.stop, args=(signal.SIGTERM,), daemon=True).start()
            loop.run(session.close())
        assert tokens == expected[0, ids.shape[1] :].tolist()
        victim.proc.wait(30)
        assert "draining" in victim.log
    finally:
        stop_all(nodes)


def test_rebalance_moves_to_a_gap_without_breaking_open_session(coordinator, tiny_llama):
    import asyncio

    from torchnode.models.checkpoint import resolve
    from torchnode.models.families import load_span
    from torchnode.protocol.wire.grpc_node import GrpcNodeClient as NodeClient
    from torchnode.protocol.wire.identity import Identity
    from torchnode.protocol.wire.node_client import SessionSpec

    fixed = ("--rebalance-period", "0")
    nodes = [join(str(tiny_llama), coordinator, "--num-blocks", "2", *fixed) for _ in range(2)]
    try:
        mover = join(str(tiny_llama), coordinator, "--num-blocks", "2", "--rebalance-period", "2")
        nodes.append(mover)
        old = (mover.start, mover.end)
        other = next(n for n in nodes[:2] if (n.start, n.end) != old)  # serves the span the mover does not
        local = load_span(resolve(str(tiny_llama)), *old)
        x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0))

        async def open_and_step():
            client = NodeClient(mover.address, Identity.generate())
            stream = client.open_session(SessionSpec("rebalance", old[0], old[1], max_length=16))
            out = await stream.step(x[:, :2], 0, 10)
            return client, stream, out

        async def step_again(stream):
            return await stream.step(x[:, 2:], 2, 10)

        loop = asyncio.new_event_loop()
        client, stream, first = loop.run_until_complete(open_and_step())
        other.stop(signal.SIGTERM)  # its span is now a gap: the mover should go there
        mover.wait_for("rebalancing: moving", 30)
        mover.wait_for(rf"ready: serving blocks {other.start}:{other.end}", 60)
        second = loop.run_until_complete(step_again(stream))  # the session on the old span still works
        loop.run_until_complete(client.close())
        loop.close()
        expected = local(x, 0, *old)
        assert torch.allclose(torch.cat([first, second], dim=1), expected, atol=1e-5)

        hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        ids = torch.tensor([[1, 5, 9, 14]])
        with DistributedModel.from_pretrained(str(tiny_llama), initial_peers=[coordinator]) as model:
            assert model.generate(ids, max_new_tokens=16).tolist() == hf_greedy(hf, ids, 16).tolist()
    finally:
        stop_all(nodes)


def is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # gRPC listens on ::ffff:127.0.0.1 (dual-stack socket)
    return (mapped or address).is_loopback


def test_swarm_node_listens_and_dials_only_loopback(coordinator, tiny_llama):
    import psutil

    node = join(str(tiny_llama), coordinator, "--blocks", "0:4")
    try:
        procs = [psutil.Process(node.proc.pid), *psutil.Process(node.proc.pid).children(recursive=True)]
        sockets = [c for p in procs for c in p.net_connections(kind="inet")]
        assert any(c.status == psutil.CONN_LISTEN for c in sockets)  # gRPC and p2pd are in there
        for c in sockets:
            assert is_loopback(c.laddr.ip), c
            if c.raddr:
                assert is_loopback(c.raddr.ip), c
    finally:
        node.stop()
