"""Volunteers behind a home router: a node behind a real NAT (network namespaces, iptables MASQUERADE)
is found unreachable, serves through a relay, and a client on the public side gets transformers' exact
tokens; a relay that dies mid-session is replaced; a relay that flips a byte is caught."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from greedy import hf_greedy
from nat_lab import HOME_IP, PUBLIC_IP, nat_lab, unavailable
from swarm import TORCHNODE, NodeProcess, free_port, spawn, start_coordinator, start_node, stop_all, wait_ready
from transformers import AutoModelForCausalLM

from torchnode.client.sync_model import DistributedModel
from torchnode.node.relay import RelayServer
from torchnode.protocol.wire.grpc_node import GrpcNodeClient
from torchnode.protocol.wire.identity import Identity
from torchnode.protocol.wire.node_client import NodeError, SessionSpec
from torchnode.protocol.wire.relay_link import RelayLink

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

EXPIRATION = 8.0
RELAYED = r"relayed: reachable through relay (\w+) at ([\d.]+):(\d+)"
RELAY_READY = r"relay ready at \S+ as peer (\w+)"
PROMPT = [[1, 5, 9, 14, 3, 27]]

# The client runs inside the public namespace: first tokens, a pause (the test may kill a relay), the rest.
CLIENT = f"""
import json, sys, torch
from torchnode import DistributedModel
from torchnode.client.session import RetryPolicy

model_path, maddrs, first_n, rest_n = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
patient = RetryPolicy(max_attempts=12, max_seconds=90)  # the moved node's new record may take a while to be seen
with DistributedModel.from_pretrained(model_path, initial_peers=maddrs, retry=patient) as model:
    with model.session(max_length=64) as s:
        first = s.generate(torch.tensor({PROMPT}), max_new_tokens=first_n)
        print("PAUSED", flush=True)
        sys.stdin.readline()
        out = s.generate(first, max_new_tokens=rest_n)
print("IDS", json.dumps(out.tolist()), flush=True)
"""


def in_ns(lab, ns: str, *args: str, port: int = 0) -> NodeProcess:
    return spawn([*lab.exec(ns), *TORCHNODE, *args], port, None)


@pytest.fixture(scope="module")
def nat_swarm(tiny_llama):
    reason = unavailable()
    if reason:
        pytest.skip(f"no NAT lab here: {reason}")
    with nat_lab() as lab:
        procs = []
        try:
            first = in_ns(
                lab,
                lab.public,
                "coordinator",
                "--host",
                PUBLIC_IP,
                "--port",
                "31337",
                "--relay",
                "--relay-port",
                "31400",
            )
            procs.append(first)
            maddr = first.wait_for(r"ready: --initial-peers (\S+)", 60)[1]
            second = in_ns(
                lab,
                lab.public,
                "coordinator",
                "--host",
                PUBLIC_IP,
                "--port",
                "31338",
                "--initial-peers",
                maddr,
                "--relay",
                "--relay-port",
                "31401",
            )
            procs.append(second)
            relays = {p.wait_for(RELAY_READY, 60)[1]: p for p in (first, second)}
            # Both coordinators are bootstrap peers, as in any real swarm: the relay the test kills may be the
            # first one, and a DHT peer whose only bootstrap peer died cannot find the survivors reliably.
            maddr = ",".join([maddr, second.wait_for(r"ready: --initial-peers (\S+)", 60)[1]])
            node = in_ns(
                lab,
                lab.home,
                "join",
                str(tiny_llama),
                "--initial-peers",
                maddr,
                "--host",
                HOME_IP,
                "--port",
                "31330",
                "--expiration",
                str(EXPIRATION),
                "--blocks",
                "0:4",
                port=31330,
            )
            procs.append(node)
            wait_ready(node)
            yield lab, maddr, node, relays
        finally:
            stop_all(procs)


def run_client(lab, model: str, maddr: str, first_n: int, rest_n: int) -> subprocess.Popen:
    return subprocess.Popen(
        [*lab.exec(lab.public), *TORCHNODE[:1], "-c", CLIENT, model, maddr, str(first_n), str(rest_n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(proc: subprocess.Popen, prefix: str, seen: list[str] | None = None) -> str:
    """The client's first line starting with `prefix`; every line read goes to `seen`."""
    seen = [] if seen is None else seen
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"client ended without {prefix!r}:" + "".join(seen))


def test_node_behind_nat_is_unreachable_and_serves_through_a_relay(nat_swarm, tiny_llama):
    lab, maddr, node, relays = nat_swarm
    assert not lab.can_dial(lab.public, HOME_IP, 31330)  # the lab's NAT really drops inbound connections
    assert re.search(r"reachability: NOT reachable \(.*behind a NAT", node.log), node.log
    relay_id, relay_host, _ = node.wait_for(RELAYED, 30).groups()
    assert relay_id in relays and relay_host == PUBLIC_IP

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    client = run_client(lab, str(tiny_llama), maddr, 4, 12)
    try:
        read_until(client, "PAUSED")
        client.stdin.write("go\n")
        client.stdin.flush()
        ids = json.loads(read_until(client, "IDS")[4:])
    finally:
        client.kill()
    assert ids == hf_greedy(hf, torch.tensor(PROMPT), 16).tolist()


def test_relay_dies_mid_session_node_moves_and_session_fails_over(nat_swarm, tiny_llama):
    lab, maddr, node, relays = nat_swarm
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    client = run_client(lab, str(tiny_llama), maddr, 4, 12)
    try:
        read_until(client, "PAUSED")  # the session's KV cache sits on the node, reached through the relay
        before = len(re.findall(RELAYED, node.log))
        dead = re.findall(RELAYED, node.log)[-1][0]
        relays[dead].stop(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(re.findall(RELAYED, node.log)) == before:  # the node re-announces through another relay
            assert time.monotonic() < deadline, node.log
            time.sleep(0.1)
        moved_to = re.findall(RELAYED, node.log)[-1][0]
        assert moved_to != dead and moved_to in relays
        client.stdin.write("go\n")
        client.stdin.flush()
        seen: list[str] = []
        ids = json.loads(read_until(client, "IDS", seen)[4:])
    finally:
        client.kill()
    assert "re-routing" in "".join(seen)  # the session really lost the node's old address and recovered
    assert ids == hf_greedy(hf, torch.tensor(PROMPT), 16).tolist()


class FlippingRelay(RelayServer):
    """A dishonest relay: flips one byte in the middle of the first large chunk it carries (hidden states)."""

    flipped = 0

    def throttle(self, node):
        honest = super().throttle(node)

        async def through(data: bytes) -> bytes:
            data = await honest(data)
            if not self.flipped and len(data) >= 1000:
                self.flipped += 1
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]
            return data

        return through


def test_reachable_no_serves_a_real_generation_through_the_relay_on_loopback(tiny_llama):
    """No namespaces needed: `join --reachable no` registers with the coordinator's relay and announces the
    relay's port, not its own; a client that finds it in the DHT gets transformers' exact tokens through it."""
    relay_port = free_port()
    coordinator, maddr = start_coordinator("--relay", "--relay-port", str(relay_port))
    procs = [coordinator]
    try:
        coordinator.wait_for(RELAY_READY, 30)
        node = start_node(str(tiny_llama), "--initial-peers", maddr, "--reachable", "no", "--blocks", "0:4")
        procs.append(node)
        _, host, port = node.wait_for(RELAYED, 60).groups()
        relayed = f"{host}:{port}"
        assert relayed != node.address
        ids = torch.tensor(PROMPT)
        hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        with DistributedModel.from_pretrained(str(tiny_llama), initial_peers=[maddr]) as model:
            hops = model.run(model.async_model.route())
            assert [h.node.address for h in hops] == [relayed]  # the only address it announced: the relay's
            assert model.generate(ids, max_new_tokens=16).tolist() == hf_greedy(hf, ids, 16).tolist()
    finally:
        stop_all(procs)


@pytest.mark.asyncio
async def test_relay_that_flips_a_byte_is_caught_by_signature_checks(tiny_llama):
    """A plaintext (--insecure) node served through a relay that flips one byte: the signed message no
    longer verifies, and the step fails with a signature error instead of returning altered states.
    (Over TLS, the default, the flip breaks the TLS record's integrity check before that.)"""
    node = start_node(str(tiny_llama), "--blocks", "0:4", "--insecure")
    relay = FlippingRelay(Identity.generate(), "127.0.0.1", 0, None)
    await relay.start()
    link = RelayLink(None, Identity.generate(), node.address, on_change=None)
    client = None
    try:
        registration = await link._register(relay.entry(expiration=0.0))
        serving = asyncio.create_task(link.serve(registration))
        client = GrpcNodeClient(registration.address, Identity.generate(), insecure=True)
        info = await client.info()  # small messages pass untouched: the relayed path itself works
        session = client.open_session(SessionSpec("flip", 0, 4, 64))
        with pytest.raises(NodeError, match="signature"):
            await session.step(torch.randn(1, 6, info.hidden_size), 0, 10.0)
        assert relay.flipped == 1
        serving.cancel()
    finally:
        if client is not None:
            await client.close()
        await relay.close()
        node.stop()


def test_routing_counts_a_relayed_nodes_extra_leg():
    """Two replicas alike but for the relay: every route takes the direct one (the spread is 10 %, the
    relay's leg more than that here)."""
    from torchnode.client.routing import Candidate, find_route

    direct = Candidate("direct", 0, 4, throughput=1000.0, rtt=0.002)
    relayed = Candidate("relayed", 0, 4, throughput=1000.0, rtt=0.002, relayed=True)
    assert {find_route([relayed, direct], 4)[0].key for _ in range(50)} == {"direct"}
    assert find_route([relayed], 4)[0].key == "relayed"  # still used when it is the only one


def test_record_names_its_relay_and_refuses_a_malformed_one():
    from dataclasses import replace

    from torchnode.protocol.dht.records import RecordError, ServerRecord, decode_record, encode_record

    me, relay = Identity.generate(), Identity.generate()
    record = ServerRecord(
        me.peer_id, me.public_key, "198.18.0.1:40000", "m", "r", 0, 4, "online", 1.0, 0, "1", 1.0, relay=relay.peer_id
    )
    assert decode_record(encode_record(me, record)).relay == relay.peer_id
    assert decode_record(encode_record(me, replace(record, relay=""))).relay == ""
    with pytest.raises(RecordError, match="relay"):
        encode_record(me, replace(record, relay="not a peer id!"))


async def test_relay_limits_nodes_streams_and_bytes_per_second():
    """The relay's three limits on 127.0.0.1, no namespaces: a node beyond --relay-max-nodes is refused,
    a stream beyond --relay-max-streams is closed, and a node's bytes (both directions together) flow at
    --relay-bytes-per-second. Behind the relay: a plain TCP echo server standing in for the node's port."""
    from torchnode.node.relay import RelayLimits
    from torchnode.protocol.wire.relay_link import RelayError

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    rate = 8 << 10  # bytes per second per node
    backend = await asyncio.start_server(echo, "127.0.0.1", 0)
    local = f"127.0.0.1:{backend.sockets[0].getsockname()[1]}"
    relay = RelayServer(
        Identity.generate(), "127.0.0.1", 0, None, RelayLimits(max_nodes=1, max_streams=1, bytes_per_second=rate)
    )
    await relay.start()
    first = RelayLink(None, Identity.generate(), local, on_change=None)
    tasks, writers = [], []
    try:
        registration = await first._register(relay.entry(expiration=0.0))
        tasks.append(asyncio.create_task(first.serve(registration)))
        with pytest.raises(RelayError, match="relay full: 1 nodes"):
            await RelayLink(None, Identity.generate(), local, on_change=None)._register(relay.entry(expiration=0.0))

        host, port = registration.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writers.append(writer)
        writer.write(b"x" * 1024)
        assert await asyncio.wait_for(reader.readexactly(1024), 10) == b"x" * 1024  # the stream is spliced
        assert relay.streams == 1

        extra_reader, extra_writer = await asyncio.open_connection(host, int(port))  # one stream too many
        writers.append(extra_writer)
        assert await asyncio.wait_for(extra_reader.read(), 10) == b""  # closed without reaching the node
        assert relay.streams == 1

        size = 2 * rate  # crosses the relay twice (there and back): 4 s of budget, less the first second's burst
        started = time.monotonic()
        writer.write(b"z" * size)
        assert await asyncio.wait_for(reader.readexactly(size), 30) == b"z" * size
        elapsed = time.monotonic() - started
        assert 0.9 * (2 * size - rate) / rate <= elapsed <= 2 * size / rate + 6, elapsed  # unthrottled: milliseconds
    finally:
        for w in writers:
            w.close()
        for task in tasks:
            task.cancel()
        await relay.close()
        backend.close()


def test_the_dashboard_state_names_a_relayed_nodes_relay():
    """A record that names its relay shows as `relay` in the monitor's node state (the dashboard's "via"
    column, `torchnode swarm`'s `via`); a direct node's is empty."""
    from node_records import info_of, record_of

    from torchnode.coordinator.health_monitor import HealthMonitor, Probe

    monitor, relay = HealthMonitor(dht=None, models=["m"]), Identity.generate()
    relayed, direct = record_of(Identity.generate(), relay=relay.peer_id), record_of(Identity.generate())
    states = [monitor._node_state(r, Probe(info_of(r, 4), 0.001, None), time.time(), 0.0) for r in (relayed, direct)]
    assert [s.relay for s in states] == [relay.peer_id, ""]
    page = (Path(__file__).parents[1] / "coordinator" / "static" / "dashboard.html").read_text()
    assert '{key: "relay", label: "Via"' in page
