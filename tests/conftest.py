"""Shared fixtures: an isolated TORCHNODE_HOME, the embedded default model, tiny random models."""

from __future__ import annotations

import os
import subprocess
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


PROCESS_COMMANDS = ("torchnode", "p2pd")  # what the unit tier must never start


@pytest.fixture(autouse=True)
def unit_tier_starts_no_nodes(request, monkeypatch) -> None:
    """The tier is the explicit `swarm` marker (`pytestmark` of a module, or a test's own mark), never guessed:
    a test without it that starts a node or a DHT peer process fails here, so the mark cannot be forgotten."""
    if request.node.get_closest_marker("swarm") is not None:
        return
    real_popen = subprocess.Popen

    class UnitTierPopen(real_popen):  # type: ignore[misc, valid-type]
        def __init__(self, args, *rest, **kwargs):
            argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
            command = " ".join(argv)
            program = argv[1:3] == ["-m", "torchnode"] or Path(argv[0]).name in PROCESS_COMMANDS
            if program:
                raise RuntimeError(f"{request.node.nodeid} starts {command[:80]!r}: mark it pytest.mark.swarm")
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", UnitTierPopen)
