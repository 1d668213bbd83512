"""A hub id downloads only what a span (or the client's head) needs, offline against a local hub.

A tiny 8-block Llama saved in shards (`model.safetensors.index.json` + several `model-0000k-of-0000n`
files) is served by tests/helpers/hub_server.py in the hub's layout; huggingface_hub reaches it through its
endpoint (HF_ENDPOINT for node processes). Each server counts the bytes it sends, so the shards fetched
are checked against the index: a node's span gets the shards holding its blocks and nothing else, the
client those holding the embeddings, final norm and LM head; a span computes what the full local copy does;
and a node process started by the CLI fetches only its span's shards through HF_ENDPOINT.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from hub_server import HubServer
from swarm import start_nodes, stop_all
from tiny_models import tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM

from torchnode.models.checkpoint import SAFETENSORS_INDEX, resolve
from torchnode.models.families import load_head, load_span
from torchnode.node.server import blocks_that_fit

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

REPO_ID = "tiny-org/sharded-llama"
BLOCKS = 8


def save_sharded(directory: Path) -> Path:
    """The tiny Llama with 8 blocks and an untied head, in shards of about one block each."""
    config = tiny_config("llama")
    config.num_hidden_layers, config.tie_word_embeddings = BLOCKS, False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, max_shard_size="200KB")
    tiny_tokenizer().save_pretrained(directory)
    return directory


def shards_of(files: Path, wanted) -> set[str]:
    weight_map = json.loads((files / SAFETENSORS_INDEX).read_text())["weight_map"]
    return {shard for key, shard in weight_map.items() if wanted(key)}


def size(files: Path, shards: set[str]) -> int:
    return sum((files / s).stat().st_size for s in shards)


def in_blocks(start: int, end: int):
    return lambda key: key.startswith(tuple(f"model.layers.{i}." for i in range(start, end)))


def is_head(key: str) -> bool:
    return key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    files = save_sharded(tmp_path_factory.mktemp("sharded"))
    assert len(list(files.glob("*.safetensors"))) >= 5, "the checkpoint should be sharded for this test"
    return files


@pytest.fixture
def hub(files, tmp_path):
    """A hub server for this process, and huggingface_hub pointed at it with an empty cache."""
    with HubServer(files, REPO_ID) as server, pytest.MonkeyPatch.context() as mp:
        # huggingface_hub reads HF_ENDPOINT once, at import (node processes get it in their environment)
        mp.setattr(huggingface_hub.constants, "ENDPOINT", server.endpoint)
        template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        mp.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield server


def test_a_span_downloads_only_the_shards_of_its_blocks(hub, files):
    ckpt = resolve(REPO_ID)
    assert hub.bytes_sent(".safetensors") == 0  # config, tokenizer and index only
    assert ckpt.revision == resolve(str(files)).revision  # same fingerprint as the full local copy

    span = load_span(ckpt, 2, 4)
    needed = shards_of(files, in_blocks(2, 4))
    assert {n for n in hub.sent if n.endswith(".safetensors")} == needed
    everything = size(files, shards_of(files, lambda key: True))
    assert hub.bytes_sent(".safetensors") == size(files, needed) < everything / 2
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(span(x, 0, 2, 4), load_span(resolve(str(files)), 2, 4)(x, 0, 2, 4))


def test_the_client_downloads_only_the_shards_of_its_head(hub, files):
    ckpt = resolve(REPO_ID)
    load_head(ckpt)
    needed = shards_of(files, is_head)
    assert {n for n in hub.sent if n.endswith(".safetensors")} == needed
    assert hub.bytes_sent(".safetensors") == size(files, needed)


def test_sizing_a_span_reads_only_shard_headers(hub, files):
    """How many blocks fit (`join` without --blocks) comes from block 0's size: read from its shard's header
    through a byte range, as the hub allows, not by downloading the shard."""
    ckpt = resolve(REPO_ID)
    budget = 3 * resolve(str(files)).parameter_count(in_blocks(0, 1)) * 4  # three float32 blocks' bytes
    assert (
        blocks_that_fit(ckpt, torch.float32, budget) == blocks_that_fit(resolve(str(files)), torch.float32, budget) == 3
    )
    block0 = shards_of(files, in_blocks(0, 1))
    assert {n for n in hub.sent if n.endswith(".safetensors")} == block0
    assert hub.bytes_sent(".safetensors") <= 100_001 * len(block0)  # huggingface_hub reads 100 kB for a header
    assert not any((Path(huggingface_hub.constants.HF_HUB_CACHE)).rglob("*.safetensors"))  # nothing saved


def test_missing_shard_offline_is_a_clear_error(hub, files):
    ckpt = resolve(REPO_ID)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
            load_span(ckpt, 6, 8)


def test_a_node_started_by_the_cli_fetches_only_its_span(files, tmp_path):
    """`torchnode join HUB_ID --blocks 4:8` with HF_ENDPOINT at the local hub and an empty HF cache."""
    with HubServer(files, REPO_ID) as server:
        env = {"HF_ENDPOINT": server.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        nodes = start_nodes(REPO_ID, ["4:8"], "--insecure", env=env)  # returns once the node is ready
        stop_all(nodes)
        fetched = {n for n in server.sent if n.endswith(".safetensors")}
        assert fetched == shards_of(files, in_blocks(4, 8))
        needed = size(files, shards_of(files, in_blocks(4, 8)))
        assert server.bytes_sent(".safetensors") == needed < size(files, shards_of(files, lambda key: True))


@pytest.mark.slow
def test_gguf_converted_tensor_by_tensor_equals_transformers_loader(tmp_path, monkeypatch):
    """The embedded GGUF, dequantized one tensor at a time into a fresh safetensors cache, holds exactly the
    tensors transformers' own GGUF loader produces (names, Llama's q/k row permutation, values)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from torchnode.models.checkpoint import default_gguf
    from torchnode.models.safetensors_files import read_safetensors

    monkeypatch.setenv("TORCHNODE_CACHE", str(tmp_path))  # convert now, not reuse an earlier conversion
    converted = resolve("default")
    assert converted.path.is_relative_to(tmp_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(converted.hf_config)
    expected = load_gguf_checkpoint(str(default_gguf()), return_tensors=True, model_to_load=skeleton)["tensors"]
    expected.pop("lm_head.weight", None)  # tied to the embedding: not stored
    got = dict(read_safetensors(converted.path / "model.safetensors", lambda key: True))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k].float()) for k in got)
