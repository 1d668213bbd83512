"""Process tier: `torchnode generate --verify` against a real dishonest node process (tests/helpers/dishonest_node.py,
the real `torchnode join` with a lying span backend) serving all blocks, next to an honest chain of two
nodes covering the same blocks, all found through the DHT of a coordinator that runs the dashboard; the
fraud proof it writes is checked by `torchnode check-evidence`, and the signed report the client publishes
in the DHT shows in the dashboard's state for the liar."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from swarm import TORCHNODE, free_port, run_cli, spawn, start_nodes, stop_all, wait_ready
from transformers import AutoModelForCausalLM, AutoTokenizer

from torchnode.client.verification.evidence import EvidenceError, check_evidence
from torchnode.models.checkpoint import resolve

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

PROMPT = "The quick brown fox"
NEW = 16


def test_cli_verify_catches_a_dishonest_process_and_its_evidence_proves_it(tiny_llama, tmp_path):
    model = str(tiny_llama)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=NEW, do_sample=False, attention_mask=torch.ones_like(ids))
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    home = tmp_path / "home"
    env = {"TORCHNODE_HOME": str(home)}
    script = str(Path(__file__).parent / "helpers" / "dishonest_node.py")
    coordinator = spawn(
        [*TORCHNODE, "coordinator", "--port", str(free_port()), "--dashboard", "--http-port", "0", "--refresh", "1"]
        + ["--check-model", model],  # the monitor holds the weights: it re-checks uploaded proofs
        0,
        env,
    )
    nodes = []
    try:
        maddr = coordinator.wait_for(r"ready: --initial-peers (\S+)", 60)[1]
        url = coordinator.wait_for(r"dashboard: (http://127\.0\.0\.1:\d+/)", 60)[1]
        port = free_port()
        join = ["join", model, "--blocks", "0:4", "--port", str(port), "--initial-peers", maddr]
        liar = spawn([sys.executable, script, "decode", *join], port, env)
        nodes = [liar]
        # honest: a chain covering the liar's blocks (one hop is cheaper: the liar is routed to)
        nodes += start_nodes(model, ["0:2", "2:4"], "--initial-peers", maddr, env=env)
        wait_ready(liar)
        args = ("generate", model, PROMPT, "--initial-peers", maddr, "--max-new-tokens", str(NEW), "--greedy")
        for _ in range(6):  # routing may pick the honest chain (RTTs on a busy machine); the liar, as a
            # checker, answers prefills honestly and goes unnoticed then: the answer must be right all the same
            result = run_cli(*args, "--verify", "--verify-window", "4", "--report-to", url, env=env)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == expected.strip()
            if "dishonest" in result.stderr:
                break
        warning = next((line for line in result.stderr.splitlines() if "dishonest" in line), result.stderr)
        assert liar.address in warning and liar.peer_id in warning, warning

        evidence = sorted((home / "evidence").glob(f"{liar.peer_id}-*.evidence"))
        assert evidence, result.stderr
        digest = hashlib.sha256(evidence[0].read_bytes()).hexdigest()
        reported = wait_reports(url, liar.peer_id, timeout=30)  # the client's signed report, read from the DHT
        assert reported["reports"] == 1 and reported["report_evidence"] == [digest]
        honest = [n for m in state(url)["models"] for n in m["nodes"] if n["peer_id"] != liar.peer_id]
        assert honest and all(n["reports"] == 0 for n in honest)
        # the proof itself, uploaded by the client (--report-to), served back and re-checked by the monitor
        with urllib.request.urlopen(url + f"api/v1/evidence/{digest}", timeout=10) as r:
            assert r.read() == evidence[0].read_bytes()
        proven = wait_node(url, liar.peer_id, lambda n: n["evidence"] and n["evidence"][0]["status"] != "pending", 300)
        assert proven["dishonest"] and proven["proven_reports"] == 1, proven["evidence"]
        assert all(not n["dishonest"] for m in state(url)["models"] for n in m["nodes"] if n["peer_id"] != liar.peer_id)
    finally:
        stop_all(nodes)
        coordinator.stop()

    check = run_cli("check-evidence", str(evidence[0]), model, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert re.search(
        rf"PROVEN: node {re.escape(liar.address)} \(peer {liar.peer_id}\) signed a wrong output", check.stdout
    )

    forged = tmp_path / "forged.evidence"
    data = bytearray(evidence[0].read_bytes())
    data[-40] ^= 1  # one flipped bit in the last reply: its signature no longer holds
    forged.write_bytes(bytes(data))
    with pytest.raises(EvidenceError, match="signature|another request"):
        check_evidence(forged, resolve(model))


def state(url: str) -> dict:
    with urllib.request.urlopen(url + "api/v1/state", timeout=10) as r:
        return json.load(r)


def wait_node(url: str, peer_id: str, ready, timeout: float) -> dict:
    """The dashboard's state of node `peer_id` once `ready(node)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        node = next((n for m in state(url)["models"] for n in m["nodes"] if n["peer_id"] == peer_id), None)
        if node is not None and ready(node):
            return node
        if time.monotonic() > deadline:
            raise AssertionError(f"node {peer_id} not as expected within {timeout} s: {node}")
        time.sleep(1.0)


def wait_reports(url: str, peer_id: str, timeout: float) -> dict:
    """The dashboard's state of node `peer_id` once some fraud report names it."""
    deadline = time.monotonic() + timeout
    while True:
        node = next((n for m in state(url)["models"] for n in m["nodes"] if n["peer_id"] == peer_id), None)
        if node is not None and node["reports"]:
            return node
        if time.monotonic() > deadline:
            raise AssertionError(f"no fraud report for {peer_id} within {timeout} s; the node's state: {node}")
        time.sleep(0.5)
