"""Process tier: `torchnode generate --verify` against a real dishonest node process (tests/dishonest_node.py,
the real `torchnode join` with a lying span backend) serving all blocks, next to an honest chain of two
nodes covering the same blocks; the fraud proof it writes is checked by `torchnode check-evidence`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from swarm import run_cli, spawn, start_nodes, stop_all, wait_ready, free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from torchnode.client.evidence import EvidenceError, check_evidence
from torchnode.models.checkpoint import resolve

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
    script = str(Path(__file__).with_name("dishonest_node.py"))
    port = free_port()
    liar = spawn([sys.executable, script, "decode", "join", model, "--blocks", "0:4", "--port", str(port)], port, env)
    nodes = [liar]
    try:
        nodes += start_nodes(model, ["0:2", "2:4"], env=env)  # honest: a chain covering the liar's blocks (one hop is cheaper: the liar is routed to)
        wait_ready(liar)
        peers = ",".join(n.address for n in nodes)
        args = ("generate", model, PROMPT, "--peers", peers, "--max-new-tokens", str(NEW), "--greedy")
        result = run_cli(*args, "--verify", "--verify-window", "4", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected.strip()
        warning = next(line for line in result.stderr.splitlines() if "dishonest" in line)
        assert liar.address in warning and liar.peer_id in warning
    finally:
        stop_all(nodes)

    evidence = sorted((home / "evidence").glob(f"{liar.peer_id}-*.evidence"))
    assert evidence, result.stderr
    check = run_cli("check-evidence", str(evidence[0]), model, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert re.search(rf"PROVEN: node {re.escape(liar.address)} \(peer {liar.peer_id}\) signed a wrong output", check.stdout)

    forged = tmp_path / "forged.evidence"
    data = bytearray(evidence[0].read_bytes())
    data[-40] ^= 1  # one flipped bit in the last reply: its signature no longer holds
    forged.write_bytes(bytes(data))
    with pytest.raises(EvidenceError, match="signature|another request"):
        check_evidence(forged, resolve(model))
