"""Process tier: `torchnode generate --verify` in a swarm of mixed precisions, over real `torchnode join` processes:
float32 nodes of blocks 0:2 and 2:4, an honest `--quant int8` node of 0:2, and a lying `--quant int8` node of
2:4 (tests/helpers/dishonest_node.py, which claims 100x its speed so that routing picks it). Over many runs,
with push into every hop, without push, and with `--draft ngram`, no honest node is ever accused, the liar is
caught every time it is routed, and the answer is that of an honest chain. The liar's evidence, whose steps got
their inputs by node-to-node push, is proven by `torchnode check-evidence` (replayed with int8 weights); its
pushed inputs tampered with, it is no proof."""

from __future__ import annotations

import sys
from pathlib import Path

import msgpack
import pytest
from swarm import free_port, run_cli, spawn, start_nodes, stop_all, wait_ready

from torchnode.client.verification.evidence import EvidenceError, check_evidence
from torchnode.models.checkpoint import resolve

pytestmark = pytest.mark.swarm  # the process tier: real node processes

PROMPT = "The quick brown fox"
NEW = 12
# each run with --verify. Push is on by default, but only into nodes at least --push-min-rtt-ms (5) away: these are
# on loopback, so PUSH asks for it into every hop
PUSH = ("--push-min-rtt-ms", "0")
MODES = [PUSH, ("--no-push",), ("--draft", "ngram")]
TRIES = 4  # runs per mode until the liar is routed (its claim makes that likely; RTTs on a busy machine vary)


def test_mixed_precisions_under_verify_accuse_only_the_liar(tiny_llama, tmp_path):
    model = str(tiny_llama)
    env = {"TORCHNODE_HOME": str(tmp_path / "home")}
    script = str(Path(__file__).parent / "helpers" / "dishonest_node.py")
    port = free_port()
    join = ["join", model, "--blocks", "2:4", "--quant", "int8", "--port", str(port)]
    liar = spawn([sys.executable, script, "decode", *join], port, env)
    nodes = [liar]
    try:
        nodes += start_nodes(model, ["0:2", "2:4"], env=env)
        fp32_a, fp32_b = nodes[1], nodes[2]
        nodes += start_nodes(model, ["0:2"], "--quant", "int8", env=env)
        int8_a = nodes[3]
        wait_ready(liar)
        honest = [fp32_a, fp32_b, int8_a]
        peers = ",".join(n.address for n in nodes)
        base = ("generate", model, PROMPT, "--max-new-tokens", str(NEW), "--greedy")
        # what an honest chain answers: float32 throughout, or the int8 node first (routing may pick either)
        references = set()
        for chain in ([fp32_a, fp32_b], [int8_a, fp32_b]):
            result = run_cli(*base, "--peers", ",".join(n.address for n in chain), env=env)
            assert result.returncode == 0, result.stderr
            references.add(result.stdout.strip())
        evidence_dir = tmp_path / "home" / "evidence"
        pushed_evidence = []
        for mode in MODES:
            for _ in range(TRIES):
                result = run_cli(*base, "--peers", peers, "--verify", "--verify-window", "4", *mode, env=env)
                assert result.returncode == 0, result.stderr
                accusations = [line for line in result.stderr.splitlines() if "dishonest node" in line]
                assert not [line for line in accusations for n in honest if n.address in line], accusations
                assert "nan" not in " ".join(accusations)
                assert result.stdout.strip() in references, (mode, result.stdout, references)
                if any(liar.address in line and liar.peer_id in line for line in accusations):
                    break
            else:
                raise AssertionError(f"the liar was never caught with {mode} in {TRIES} runs: {result.stderr}")
            if mode == PUSH:  # its proof's steps got their inputs by push
                pushed_evidence = sorted(evidence_dir.glob(f"{liar.peer_id}-*.evidence"))
    finally:
        stop_all(nodes)

    evidence = pushed_evidence
    assert evidence
    record = msgpack.unpackb(evidence[0].read_bytes())
    assert record["quant"] == "int8" and record["info"]
    pushed = [i for i, e in enumerate(record["exchanges"]) if len(e) == 3 and e[2]]
    assert pushed, "the liar's steps got their inputs by push: the client's copies ship with the proof"
    check = run_cli("check-evidence", str(evidence[0]), model, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"PROVEN: node {liar.address} (peer {liar.peer_id})" in check.stdout

    exchange = record["exchanges"][pushed[0]]
    tampered = bytearray(exchange[2])
    tampered[-3] ^= 1  # one flipped bit in the client's copy of a pushed input
    exchange[2] = bytes(tampered)
    forged = tmp_path / "forged.evidence"
    forged.write_bytes(msgpack.packb(record, use_bin_type=True))
    with pytest.raises(EvidenceError, match="input_digest"):
        check_evidence(forged, resolve(model))
