"""`torchnode chat`: multi-turn over real nodes, surviving a node change between turns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from swarm import free_port, start_node, start_nodes, stop_all

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers


def read_until(proc: subprocess.Popen, marker: str) -> str:
    out = ""
    while marker not in out:
        ch = proc.stdout.read(1)
        if not ch:
            raise AssertionError(f"chat ended before {marker!r}:\n{out}\n{proc.stderr.read()}")
        out += ch
    return out


def test_chat_two_turns_survive_node_change(tiny_llama):
    nodes = start_nodes(str(tiny_llama), ["0:2", "2:4"])
    spare_port = free_port()  # listed from the start, but its node only starts between the turns
    try:
        peers = ",".join([*(n.address for n in nodes), f"127.0.0.1:{spare_port}"])
        proc = subprocess.Popen(
            [sys.executable, "-m", "torchnode", "chat", str(tiny_llama), "--peers", peers, "--max-new-tokens", "12"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "COLUMNS": "200", "TERM": "dumb"},
        )
        read_until(proc, "you>")
        proc.stdin.write("Hello!\n")
        proc.stdin.flush()
        first = read_until(proc, "you>")
        assert "assistant>" in first
        nodes.append(start_node(str(tiny_llama), "--blocks", "0:2", port=spare_port))
        nodes[0].stop(signal.SIGKILL)  # the node that served 0:2 in turn 1 is gone; its cache is rebuilt on the spare
        proc.stdin.write("Tell me more.\n")
        proc.stdin.flush()
        second = read_until(proc, "you>")
        assert "assistant>" in second
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        stop_all(nodes)
