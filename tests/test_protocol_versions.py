"""Protocol versions: nodes of other majors are skipped by clients, refused by nodes, and shown as outdated.

Unit tier: the version rules, DHT records with and without the field, the no-route message. Process tier:
real nodes started by `tests/helpers/versioned_cli.py` (the real `torchnode join`, announcing another
protocol version), a coordinator's DHT, the real `torchnode generate`, `swarm` and `models`.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgpack
import pytest
import torch
from node_records import record_of
from swarm import free_port, run_cli, spawn, start_coordinator, stop_all, wait_ready
from transformers import AutoModelForCausalLM, AutoTokenizer

from torchnode.client.discovery import Unspoken, unspoken_route_error
from torchnode.client.routing import NoRouteError
from torchnode.protocol import version
from torchnode.protocol.dht.records import RecordError, ServerRecord, decode_record, encode_record
from torchnode.protocol.wire.identity import Identity

VERSIONED = str(Path(__file__).parent / "helpers" / "versioned_cli.py")
PROMPT = "The quick brown fox"
NEW = 12


def record(identity: Identity, **kw) -> ServerRecord:
    return record_of(identity, **({"model": "tiny", "revision": "main", "end": 4, "cache_bytes_free": 1} | kw))


def test_same_major_talks_other_majors_do_not():
    assert version.speaks("1.7", "1.0") and version.speaks("1.0", "1.12")
    assert not version.speaks("2.0", "1.9") and not version.speaks("0.9", "1.0")
    for bad in ("1", "1.0.0", "01.0", "-1.0", "1.x", " 1.0", ""):
        with pytest.raises(ValueError, match="MAJOR.MINOR"):
            version.protocol_major(bad)


def test_records_carry_the_protocol_and_old_records_still_decode():
    identity = Identity.generate()
    signed = decode_record(encode_record(identity, record(identity, protocol="3.1")))
    assert signed.protocol == "3.1"
    older = msgpack.unpackb(msgpack.unpackb(encode_record(identity, record(identity)))["record"])
    del older["protocol"]  # a node from before the field existed
    body = msgpack.packb(older, use_bin_type=True)
    envelope = msgpack.packb({"record": body, "signature": identity.sign(body)}, use_bin_type=True)
    assert decode_record(envelope).protocol == version.UNSAID_PROTOCOL
    with pytest.raises(RecordError, match="MAJOR.MINOR"):
        encode_record(identity, record(identity, protocol="three"))


def test_no_route_names_the_nodes_of_another_protocol_and_who_upgrades():
    error = NoRouteError(list(range(15)), 30)
    newer = [Unspoken("a:1", 0, 15, "3.0"), Unspoken("b:1", 0, 10, "3.2"), Unspoken("c:1", 20, 30, "3.0")]
    message = str(unspoken_route_error(error, newer))
    assert message == "no route: 2 nodes serve blocks 0:15 but speak protocol 3, this client speaks 1: upgrade"
    older = str(unspoken_route_error(error, [Unspoken("a:1", 5, 8, "0.4")]))
    assert older == "no route: 1 node serves blocks 5:8 but speaks protocol 0, this client speaks 1: they must upgrade"
    assert unspoken_route_error(error, [Unspoken("c:1", 20, 30, "3.0")]) is error  # not about the missing blocks


def reference(model: Path) -> str:
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=NEW, do_sample=False, attention_mask=torch.ones_like(ids))
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def start_versioned(speaks: str, model: str, maddr: str, env: dict):
    port = free_port()
    args = ["join", model, "--blocks", "0:4", "--port", str(port), "--initial-peers", maddr]
    return spawn([sys.executable, VERSIONED, speaks, *args], port, env)


async def open_session_on(node, speaks: str, monkeypatch) -> str:
    """Opens a session on `node` from this process speaking `speaks`; the node's refusal, as the client sees it."""
    from torchnode.protocol.wire.grpc_node import GrpcNodeClient
    from torchnode.protocol.wire.node_client import NodeError, SessionSpec

    monkeypatch.setattr(version, "PROTOCOL", speaks)
    client = GrpcNodeClient(node.address, Identity.generate())
    session = client.open_session(SessionSpec("s1", 0, 4, max_length=32))
    try:
        await session.step(torch.zeros(1, 1, 64), 0, timeout=30)
    except NodeError as e:
        return f"{e.status}: {e}"
    finally:
        await session.close()
        await client.close()
    return "opened"


@pytest.mark.swarm
def test_clients_skip_nodes_of_another_major_and_nodes_refuse_them(tiny_llama, tmp_path, monkeypatch):
    env = {"TORCHNODE_HOME": str(tmp_path / "home")}
    model = str(tiny_llama)
    coordinator, maddr = start_coordinator(env=env)
    nodes = [coordinator]
    generate = ("generate", model, PROMPT, "--initial-peers", maddr, "--max-new-tokens", str(NEW), "--greedy")
    try:
        newer = wait_ready(start_versioned("2.0", model, maddr, env))
        nodes.append(newer)
        done = run_cli(*generate, env=env)  # this client speaks 1: the only node is of no use to it
        assert done.returncode == 1
        assert "no route: 1 node serves blocks 0:4 but speaks protocol 2, this client speaks 1: upgrade" in done.stderr
        assert "Traceback" not in done.stderr

        refusal = asyncio.run(open_session_on(newer, "1.0", monkeypatch))
        assert refusal.startswith("FAILED_PRECONDITION")
        assert "this node speaks protocol 2, this client speaks 1: upgrade" in refusal
        assert asyncio.run(open_session_on(newer, "2.5", monkeypatch)) == "opened"  # minors stay compatible
        monkeypatch.undo()

        older, minor = start_versioned("0.9", model, maddr, env), start_versioned("1.3", model, maddr, env)
        nodes += [older, minor]
        wait_ready(older), wait_ready(minor)
        done = run_cli(*generate, env=env)  # routes through the 1.3 node only, token for token
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == reference(tiny_llama).strip()

        table = run_cli("swarm", model, "--initial-peers", maddr, env=env)
        assert table.returncode == 0, table.stderr
        row = {n.peer_id: next(line for line in table.stdout.splitlines() if n.peer_id[:12] in line) for n in nodes[1:]}
        assert "0.9 outdated" in row[older.peer_id], table.stdout
        assert "2.0 newer: upgrade" in row[newer.peer_id], table.stdout
        assert "1.3" in row[minor.peer_id] and "outdated" not in row[minor.peer_id], table.stdout
        assert "all 4 blocks covered" in table.stdout  # by the 1.3 node alone

        from torchnode.coordinator.health_monitor import scan_once  # what the dashboard serves (/api/v1/state)

        (view,) = asyncio.run(scan_once([maddr], [Path(model).name])).models
        flags = {n.peer_id: (n.protocol, n.outdated, n.newer) for n in view.nodes}
        assert flags == {
            older.peer_id: ("0.9", True, False),
            newer.peer_id: ("2.0", False, True),
            minor.peer_id: ("1.3", False, False),
        }
        assert all(b.servers == 1 for b in view.blocks)  # the 1.3 node's; the others serve no client of this release

        listing = run_cli("models", "--initial-peers", maddr, env=env)
        row = next(line for line in listing.stdout.splitlines() if Path(model).name[:10] in line)
        assert "3/3 1 outdated 1 newer: upgrade" in row, listing.stdout
    finally:
        stop_all(nodes)
