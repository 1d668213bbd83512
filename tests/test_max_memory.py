"""`--max-memory` is what a node process may use: nodes given far less than the model choose their spans
through the DHT, together cover it, answer as transformers does, and each stays within its budget.

The model is small (8 blocks of 13.6 MiB in fp32) so the test is quick; the budget arithmetic is the one
a 3B model gets (scripts/bench_scale.py measures that): --max-memory = the runtime allowance + the KV cache
budget + 3.5 blocks, so each node takes 3 of the 8 blocks and three nodes are needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from greedy import hf_greedy
from swarm import start_coordinator, start_node, stop_all
from tiny_models import tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from torchnode.client.sync_model import DistributedModel
from torchnode.node.server import RUNTIME_ALLOWANCE

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

BLOCKS, HIDDEN, INTERMEDIATE = 8, 512, 1536
BLOCK_BYTES = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE) * 4  # fp32 linears; norms are a rounding error
CACHE = 32 << 20


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=BLOCKS,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("wide-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, max_shard_size="20MB")  # sharded, as the hub has it
    tiny_tokenizer().save_pretrained(folder)
    return folder


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def test_nodes_under_max_memory_choose_spans_that_cover_the_model_and_stay_within_it(wide_llama):
    max_memory = RUNTIME_ALLOWANCE["cpu"] + CACHE + int(3.5 * BLOCK_BYTES)
    coordinator, maddr = start_coordinator()
    nodes = []
    try:
        for _ in range(3):
            nodes.append(
                start_node(
                    str(wide_llama),
                    "--initial-peers",
                    maddr,
                    "--max-memory",
                    str(max_memory),
                    "--cache-memory",
                    str(CACHE),
                    "--threads",
                    "1",
                )
            )
        spans = [(n.start, n.end) for n in nodes]
        assert all(end - start == 3 for start, end in spans), spans  # 3.5 blocks' room: 3 blocks each
        assert {b for start, end in spans for b in range(start, end)} == set(range(BLOCKS)), spans

        hf = AutoModelForCausalLM.from_pretrained(wide_llama, dtype=torch.float32).eval()
        ids = torch.tensor([[1, 5, 9, 14, 3, 27, 88, 130]])
        with DistributedModel.from_pretrained(str(wide_llama), initial_peers=[maddr]) as model:
            assert model.generate(ids, max_new_tokens=16).tolist() == hf_greedy(hf, ids, 16).tolist()
        for node in nodes:  # the whole process, weights + KV caches + runtime, at its peak
            assert peak_rss(node.proc.pid) <= max_memory, (node.start, peak_rss(node.proc.pid), max_memory)
    finally:
        stop_all([*nodes, coordinator])


def test_a_max_memory_that_leaves_no_room_for_weights_is_a_clear_error(wide_llama):
    coordinator, maddr = start_coordinator()
    try:
        node = start_node(
            str(wide_llama), "--initial-peers", maddr, "--max-memory", "700MiB", "--cache-memory", "1GiB", wait=False
        )
        assert node.proc.wait(120) != 0
        assert "--max-memory" in node.log and "--cache-memory" in node.log and "Traceback" not in node.log
    finally:
        stop_all([coordinator])
