"""`torchnode chat`: multi-turn over real nodes, surviving a node change between turns: each reply is
transformers' greedy answer to the whole conversation so far, the second one served by a spare node on which
the client rebuilt the first turn's cache (without it, the spare would answer without the context)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from greedy import hf_greedy
from swarm import free_port, start_node, start_nodes, stop_all
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers


def read_until(proc: subprocess.Popen, marker: str) -> str:
    out = ""
    while marker not in out:
        ch = proc.stdout.read(1)
        if not ch:
            raise AssertionError(f"chat ended before {marker!r}:\n{out}\n{proc.stderr.read()}")
        out += ch
    return out


def reply_of(output: str) -> str:
    """The assistant's reply in what the chat printed up to the next prompt."""
    return output.split("assistant>", 1)[1].rsplit("you>", 1)[0].strip()


def expected_reply(tiny_llama, conversation: list[dict], n: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer.decode(hf_greedy(hf, ids, n)[0, ids.shape[1] :], skip_special_tokens=True).strip()


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
        first = reply_of(read_until(proc, "you>"))
        conversation = [{"role": "user", "content": "Hello!"}]
        assert first == expected_reply(tiny_llama, conversation, 12)
        nodes.append(start_node(str(tiny_llama), "--blocks", "0:2", port=spare_port))
        nodes[0].stop(signal.SIGKILL)  # the node that served 0:2 in turn 1 is gone; its cache is rebuilt on the spare
        proc.stdin.write("Tell me more.\n")
        proc.stdin.flush()
        second = reply_of(read_until(proc, "you>"))
        conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "Tell me more."}]
        assert second == expected_reply(tiny_llama, conversation, 12)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0, proc.stderr.read()
        log = proc.stderr.read()
        assert f"node {nodes[0].address} failed on blocks 0:2" in log, log  # turn 2 went to the spare
    finally:
        stop_all(nodes)
