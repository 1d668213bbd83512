"""Reports that prove (coordinator/evidence_store.py): a reporter uploads its fraud proof to the health monitor over
HTTP (POST /api/v1/evidence), anyone fetches it back by its hash, and a monitor holding the weights re-checks it
with `torchnode check-evidence`; only a proof found proven marks its node dishonest in the dashboard's state. What
the monitor keeps is bounded: one file per reporter and node, a size and a count."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from evidence_files import evidence_file
from fastapi.testclient import TestClient

from torchnode.coordinator.dashboard_app import create_app
from torchnode.coordinator.evidence_store import EvidenceLimits, EvidenceRejected, EvidenceStore
from torchnode.coordinator.health_monitor import HealthMonitor
from torchnode.coordinator.history import History
from torchnode.coordinator.state_schema import SwarmState
from torchnode.coordinator.volunteers import VolunteerLedger
from torchnode.models.checkpoint import resolve
from torchnode.protocol.wire.identity import Identity


@pytest.fixture(scope="module")
def ckpt(tiny_llama):
    return resolve(str(tiny_llama))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHNODE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_one_file_per_reporter_and_node_and_bounded_in_size_and_count(ckpt, home, tmp_path):
    reporter, other, node = Identity.generate(), Identity.generate(), Identity.generate()
    store = EvidenceStore(tmp_path / "kept", limits=EvidenceLimits(max_bytes=1 << 20, max_files=2))
    first = store.add(evidence_file(ckpt, reporter, node, lie=True, position=0).read_bytes())
    assert first.status == "unchecked" and first.node_peer_id == node.peer_id
    second = store.add(evidence_file(ckpt, reporter, node, lie=True, position=1).read_bytes())
    assert list(store.entries) == [second.sha256]  # the latest of one reporter about one node replaces the first
    assert not store.path(first.sha256).exists()
    third = store.add(evidence_file(ckpt, other, node, lie=True, position=2).read_bytes())
    fourth = store.add(evidence_file(ckpt, other, reporter, lie=True, position=3).read_bytes())
    assert list(store.entries) == [third.sha256, fourth.sha256]  # at most 2 files: the oldest went
    with pytest.raises(EvidenceRejected, match="more than") as big:
        store.add(b"x" * ((1 << 20) + 1))
    assert big.value.status == 413
    with pytest.raises(EvidenceRejected, match="not an evidence file") as junk:
        store.add(b"not msgpack at all \xc1")
    assert junk.value.status == 400


def test_proofs_are_uploaded_over_http_and_served_back(ckpt, home, tmp_path):
    store = EvidenceStore(tmp_path / "kept", limits=EvidenceLimits(max_bytes=1 << 20))
    source = SimpleNamespace(
        state=SwarmState(generated_at=0, refresh_s=5, scan_duration_s=0, monitor_version="x", dht_maddrs=[], models=[]),
        history=History(3600),
        evidence=store,
        volunteers=VolunteerLedger(),
    )
    client = TestClient(create_app(source))
    data = evidence_file(ckpt, Identity.generate(), Identity.generate(), lie=True).read_bytes()
    answer = client.post("/api/v1/evidence", content=data)
    assert answer.status_code == 201, answer.text
    sha = answer.json()["sha256"]
    assert answer.json()["status"] == "unchecked"
    assert client.get(f"/api/v1/evidence/{sha}").content == data
    assert [e["sha256"] for e in client.get("/api/v1/evidence").json()] == [sha]
    assert client.post("/api/v1/evidence", content=b"junk").status_code == 400
    assert client.post("/api/v1/evidence", content=b"x" * ((1 << 20) + 1)).status_code == 413
    assert client.get("/api/v1/evidence/" + "0" * 64).status_code == 404


@pytest.mark.swarm  # runs `torchnode check-evidence` processes
async def test_the_monitor_rechecks_proofs_and_only_proven_ones_mark_a_node_dishonest(ckpt, tiny_llama, home, tmp_path):
    reporter, liar, slandered = Identity.generate(), Identity.generate(), Identity.generate()
    store = EvidenceStore(tmp_path / "kept", check_models=[str(tiny_llama)])
    proof = store.add(evidence_file(ckpt, reporter, liar, lie=True, position=0).read_bytes())
    claim = store.add(evidence_file(ckpt, reporter, slandered, lie=False, position=1).read_bytes())
    assert proof.status == claim.status == "pending"
    checks = asyncio.create_task(store.run_checks())
    try:
        await asyncio.wait_for(store.queue.join(), 300)
    finally:
        checks.cancel()
    assert store.entries[proof.sha256].status == "proven", store.entries[proof.sha256].message
    assert "PROVEN" in store.entries[proof.sha256].message
    assert store.entries[claim.sha256].status == "not proven", store.entries[claim.sha256].message
    monitor = HealthMonitor(None, evidence=store)
    assert monitor._proofs(liar.peer_id)["dishonest"] and monitor._proofs(liar.peer_id)["proven_reports"] == 1
    assert not monitor._proofs(slandered.peer_id)["dishonest"]
    assert monitor._proofs(slandered.peer_id)["evidence"][0].status == "not proven"
