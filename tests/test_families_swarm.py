"""Every family through 3 real node processes (blocks 0:1, 1:N-1, N-1:N) equals transformers on the same files.

Per family: 32 greedy tokens token for token, and the logits of the whole generated sequence (longer than the
sliding windows of Mistral and Qwen2) within 1e-4. One tiny model per family, its 3 nodes stopped after.
"""

from __future__ import annotations

import pytest
import torch
from swarm import start_nodes, stop_all
from tiny_models import FAMILIES_UNDER_TEST, SLIDING_WINDOW, save_tiny_model
from transformers import AutoModelForCausalLM

from torchnode.client.sync_model import DistributedModel

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

NEW_TOKENS = 32
TOLERANCE = 1e-4


@pytest.mark.parametrize("family", FAMILIES_UNDER_TEST)
def test_family_through_three_nodes_equals_transformers(family, tmp_path):
    path = save_tiny_model(family, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    blocks = hf.config.num_hidden_layers
    ids = torch.tensor([[1, 5, 9, 14, 3, 27]])
    with torch.inference_mode():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS)
        expected_logits = hf(expected).logits  # (1, T + 32, V)
    assert expected.shape[1] - ids.shape[1] == NEW_TOKENS  # no end-of-sequence token cuts it short
    assert expected.shape[1] > SLIDING_WINDOW

    nodes = start_nodes(str(path), ["0:1", f"1:{blocks - 1}", f"{blocks - 1}:{blocks}"])
    try:
        assert [(n.start, n.end) for n in nodes] == [(0, 1), (1, blocks - 1), (blocks - 1, blocks)]
        with DistributedModel.from_pretrained(str(path), [n.address for n in nodes]) as model:
            got = model.generate(ids, max_new_tokens=NEW_TOKENS)
            logits = model.logits(expected)
    finally:
        stop_all(nodes)
    assert got.tolist() == expected.tolist(), f"{family}: greedy tokens differ from transformers"
    diff = (logits - expected_logits).abs().max().item()
    assert diff <= TOLERANCE, f"{family}: logits differ from transformers by {diff:.2e}"
