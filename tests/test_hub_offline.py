"""MODEL as a Hugging Face hub id, resolved offline from the hub cache by huggingface_hub.

A tiny Qwen2 is laid out as huggingface_hub lays out a download (`hub/models--org--name/blobs/<hash>`,
`snapshots/<commit>/<file>` symlinks to the blobs, `refs/main` holding the commit) under a temporary
HF_HOME; with HF_HUB_OFFLINE=1, node processes started by the CLI and the client in this process load
`org/name` from there, and generate what transformers generates from the same files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from swarm import start_nodes, stop_all
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from torchnode.client.sync_model import DistributedModel
from torchnode.models.checkpoint import resolve

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

REPO_ID = "tiny-org/tiny-qwen2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def save_to_hub_cache(files: Path, hf_home: Path, repo_id: str, commit: str) -> Path:
    """Puts the files of `files` into the hub cache under `hf_home` as a download of `repo_id` at `commit`."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(env for node processes, the snapshot folder, the original files); this process sees the same cache."""
    files = save_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))
    hf_home = tmp_path_factory.mktemp("hf-home")
    snapshot = save_to_hub_cache(files, hf_home, REPO_ID, COMMIT)
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    # huggingface_hub reads these variables once, at import, which this process did long ago
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield env, snapshot, files


def test_hub_id_resolves_to_the_cached_snapshot(hub):
    _, snapshot, files = hub
    ckpt = resolve(REPO_ID)
    assert ckpt.name == REPO_ID
    assert ckpt.path.resolve() == snapshot.resolve()
    assert ckpt.revision == resolve(str(files)).revision  # same files, same fingerprint, wherever they live
    with pytest.raises(FileNotFoundError, match="tiny-org/not-cached"):
        resolve("tiny-org/not-cached")


def test_nodes_serve_a_hub_id_offline(hub):
    env, snapshot, _ = hub
    hf = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    nodes = start_nodes(REPO_ID, ["0:1", "1:4"], env=env)
    try:
        with DistributedModel.from_pretrained(REPO_ID, [n.address for n in nodes]) as model:
            ids = torch.tensor([[1, 5, 9, 14, 3, 27]])
            got = model.generate(ids, max_new_tokens=32)
            with torch.inference_mode():
                expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32)
                assert (model.logits(ids) - hf(ids).logits).abs().max().item() < 1e-4
            assert expected.shape[1] - ids.shape[1] == 32
            assert got.tolist() == expected.tolist()
    finally:
        stop_all(nodes)
