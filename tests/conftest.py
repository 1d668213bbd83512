"""Shared fixtures: an isolated TORCHNODE_HOME, the embedded default model, tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def torchnode_home(tmp_path_factory) -> Path:
    """Keys of test nodes and clients live in a temporary folder, never in ~/.torchnode."""
    home = tmp_path_factory.mktemp("torchnode-home")
    os.environ["TORCHNODE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def default_checkpoint():
    """The embedded SmolLM2, dequantized once into the safetensors cache."""
    from torchnode.models.checkpoint import resolve

    return resolve("default")


@pytest.fixture(scope="session")
def default_reference(default_checkpoint):
    """Plain transformers running the same weights locally."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_checkpoint.path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_checkpoint.path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


PROCESS_FIXTURES = {"swarm", "rogue_swarm"}  # test_dht_records: real hivemind DHT peers (p2pd processes)


def pytest_collection_modifyitems(config, items) -> None:
    """The `swarm` mark (left out by `make test-fast`): tests that start real processes, i.e. every test
    of a module that uses the node-process helpers of tests/swarm.py, and tests using DHT-peer fixtures."""
    for item in items:
        module = getattr(item, "module", None)
        uses_processes = (
            any(getattr(v, "__module__", None) == "swarm" for v in vars(module).values()) if module else False
        )
        if uses_processes or PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.swarm)
