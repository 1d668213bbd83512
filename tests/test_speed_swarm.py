"""Process tier: speed measured, not claimed. Real `torchnode` processes found through a coordinator's DHT:

- a slow liar (tests/helpers/dishonest_node.py `slow`: honest outputs, announces 100x its speed, sleeps before
  every step) beside an honest chain: a long-lived SDK client routes through it only until it has timed it,
  and the coordinator's dashboard shows its claim beside what it measured, flagged;
- a flood of validly signed records from 50 fresh keys announcing great speed for every block at addresses
  that never answer, written to the real DHT: a client still gets its first token within 10 s.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from dishonest_node import SLOW_STEP_S
from hivemind.utils.timed_storage import get_dht_time
from swarm import free_port, spawn, start_coordinator, start_nodes, stop_all, wait_ready
from transformers import AutoModelForCausalLM

from torchnode.client.model import AsyncDistributedModel
from torchnode.client.sampling import SamplingParams
from torchnode.models.checkpoint import resolve
from torchnode.protocol.dht.network import announce, start_dht
from torchnode.protocol.dht.records import ServerRecord
from torchnode.protocol.version import __version__
from torchnode.protocol.wire.identity import Identity
from torchnode.protocol.wire.node_client import DEFAULT_PROBE_TIMEOUT

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300, 12]])
NEW = 8
LIAR = str(Path(__file__).parent / "helpers" / "dishonest_node.py")
FAKE_KEYS = 50
FIRST_TOKEN_GOAL_S = 10.0


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    out = hf.generate(PROMPT, max_new_tokens=NEW, do_sample=False, attention_mask=torch.ones_like(PROMPT))
    return out[0, PROMPT.shape[1] :].tolist()


async def generation(model: AsyncDistributedModel) -> tuple[list[int], list[str], list[str], int]:
    """Tokens, the session's route at its start and at its end, and how often it re-routed for speed."""
    session = await model.open_session(PROMPT.shape[1] + NEW)
    first = [h.node.address for h in session.hops]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    try:
        tokens = [int(t[0]) async for t in model.generate_ids(PROMPT, params, session)]
    finally:
        await session.close()
    return tokens, first, [h.node.address for h in session.hops], session.reroutes


async def test_a_long_lived_client_stops_routing_through_a_slow_liar(tiny_llama, expected):
    model = str(tiny_llama)
    coordinator, maddr = start_coordinator("--dashboard", "--http-port", "0", "--refresh", "1")
    url = coordinator.wait_for(r"dashboard: (http://127\.0\.0\.1:\d+/)", 60)[1]
    nodes = []
    try:
        port = free_port()
        liar = spawn(
            [sys.executable, LIAR, "slow", "join", model, "--blocks", "0:4", "--port", str(port)]
            + ["--initial-peers", maddr],
            port,
            None,
        )
        nodes = [liar, *start_nodes(model, ["0:2", "2:4"], "--initial-peers", maddr)]
        wait_ready(liar)
        client = await AsyncDistributedModel.from_pretrained(model, initial_peers=[maddr])
        try:
            runs = [await generation(client) for _ in range(6)]
        finally:
            await client.close()
        shown = await asyncio.to_thread(measured_nodes, url, 3, timeout=60)
    finally:
        stop_all(nodes)
        coordinator.stop()
    for tokens, *_ in runs:
        assert tokens == expected
    tokens, first, last, reroutes = runs[0]
    assert first == [liar.address]  # nothing measured yet: its claim wins the first route
    assert liar.address not in last and reroutes == 1  # left mid-session once timed, history replayed
    for _, first, last, _ in runs[1:]:  # every later session routes around it
        assert liar.address not in first + last, runs
    by_address = {n["address"]: n for n in shown}
    claimed, measured = by_address[liar.address]["throughput"], by_address[liar.address]["measured_throughput"]
    assert by_address[liar.address]["overclaims"] and measured < claimed / 10, by_address[liar.address]
    assert measured < 2 / SLOW_STEP_S  # the sleep shows (less the RTT the monitor takes off)
    honest = [n for a, n in by_address.items() if a != liar.address]
    assert len(honest) == 2 and not any(n["overclaims"] for n in honest), honest


def measured_nodes(url: str, count: int, timeout: float) -> list[dict]:
    """The dashboard's nodes once `count` of them show a measured speed."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url + "api/v1/state", timeout=10) as r:
            nodes = [n for m in json.load(r)["models"] for n in m["nodes"]]
        if sum(n["measured_throughput"] is not None for n in nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {count} nodes measured within {timeout} s: {nodes}")
        time.sleep(0.5)


async def test_a_flood_of_fake_fast_records_does_not_delay_the_first_token(tiny_llama, expected):
    model = str(tiny_llama)
    ckpt = resolve(model)
    coordinator, maddr = start_coordinator()
    tarpit = socket.socket()  # accepts connections (the kernel's backlog) and never answers a byte
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(1024)
    closed = free_port()  # nothing listens here
    nodes, dht = [], None
    try:
        nodes = start_nodes(model, ["0:4"], "--initial-peers", maddr)
        dht = start_dht([maddr])
        for i in range(FAKE_KEYS):
            identity = Identity.generate()
            address = f"127.0.0.1:{tarpit.getsockname()[1] if i % 2 else closed}"
            record = ServerRecord(
                peer_id=identity.peer_id,
                public_key=identity.public_key,
                address=address,
                model=ckpt.name,
                revision=ckpt.revision,
                start=0,
                end=4,
                state="online",
                throughput=1e6,
                cache_bytes_free=1 << 40,
                version=__version__,
                expiration=get_dht_time() + 100,  # the validators allow at most 120 s ahead
                total_blocks=4,
            )
            assert all(announce(dht, identity, record).values())

        started = time.monotonic()
        client = await AsyncDistributedModel.from_pretrained(model, initial_peers=[maddr])
        try:
            found = await client.source.nodes(client.ckpt.name, client.total_blocks)
            assert len(found) == FAKE_KEYS + 1  # the client sees the whole flood
            params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
            tokens, asked = [], time.monotonic()
            async for new in client.generate_ids(PROMPT, params):
                if not tokens:
                    first_token, routed = time.monotonic() - started, time.monotonic() - asked
                tokens.append(int(new[0]))
        finally:
            await client.close()
    finally:
        stop_all(nodes)
        coordinator.stop()
        tarpit.close()
        if dht is not None:
            await asyncio.to_thread(dht.shutdown)
    assert tokens == expected
    print(f"first token {first_token:.2f} s after from_pretrained ({routed:.2f} s after asking), {FAKE_KEYS} fake keys")
    assert first_token < FIRST_TOKEN_GOAL_S, f"first token after {first_token:.1f} s"
    # the unanswered half of the flood did not hold the route for a whole probe timeout (client/discovery.py)
    assert routed < DEFAULT_PROBE_TIMEOUT, f"first token {routed:.1f} s after asking"
