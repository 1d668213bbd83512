"""Shared fixtures: an isolated TORCHNODE_HOME, the embedded default model, tiny random models, and the
fixtures more than one test module needs (PEFT adapters, the OpenAI API over a module's nodes, DHT peers,
pools of in-memory nodes). Plain helpers live in tests/helpers/; no test module imports another."""

from __future__ import annotations

import os
import re
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


@pytest.fixture(scope="module")
def ckpt(tiny_llama):
    """The tiny llama's checkpoint, as in-memory nodes and clients load it."""
    from torchnode.models.checkpoint import resolve

    return resolve(str(tiny_llama))


@pytest.fixture
def memory_pool():
    """In-memory nodes a test makes (helpers append to this list), shut down after the test."""
    made: list = []
    yield made
    for node in made:
        node.shutdown()


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Two random PEFT LoRAs of the tiny llama, by name (their folders' names)."""
    from lora_models import make_lora

    root = tmp_path_factory.mktemp("adapters")
    return {name: make_lora(tiny_llama, root / name, seed) for name, seed in (("tone-a", 1), ("tone-b", 2))}


@pytest.fixture(scope="module")
def peft_references(tiny_llama, adapters) -> dict[str | None, object]:
    """The local peft model of each adapter, and the base model under None: the references."""
    from lora_models import peft_model

    return {None: peft_model(tiny_llama, None)} | {name: peft_model(tiny_llama, p) for name, p in adapters.items()}


@pytest.fixture(scope="module")
def api(tiny_llama, nodes):
    """The OpenAI API over the requesting module's `nodes` fixture, on 127.0.0.1."""
    from openai_server import Api

    api = Api(tiny_llama, nodes)
    yield api
    api.close()


@pytest.fixture(scope="module")
def client(api):
    """The official `openai` client of `api`."""
    import openai

    with openai.OpenAI(base_url=f"{api.url}/v1", api_key="none", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def dht_peers():
    """A real hivemind DHT on 127.0.0.1: two server peers and a client peer, with our validators."""
    from torchnode.protocol.dht.network import start_dht, visible_maddrs

    dhts = []
    try:
        dhts.append(start_dht([]))
        dhts.append(start_dht(visible_maddrs(dhts[0])))
        dhts.append(start_dht(visible_maddrs(dhts[1]), client_mode=True))
        yield dhts
    finally:
        for dht in dhts:
            dht.shutdown()


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


# Under TORCHNODE_CI=1 (.ci/run) a skip is a failure unless a GPU is what is missing: CI installs what the
# other tests need (root, iptables, Chromium, the dev dependencies), so any other skip means a lost test.
EXPECTED_SKIP = re.compile(r"CUDA|GPU")


def fail_unexpected_skip(report) -> None:
    """Turns a skip `report` (of a test, or of a whole module) into a failure under TORCHNODE_CI=1."""
    if os.environ.get("TORCHNODE_CI") != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not EXPECTED_SKIP.search(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped under TORCHNODE_CI=1, where only GPU tests may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    fail_unexpected_skip((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    fail_unexpected_skip((yield).get_result())  # a module-level skip (importorskip) skips all its tests
