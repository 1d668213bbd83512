"""A node can die or hang mid-generation and the tokens are those of an undisturbed run."""

from __future__ import annotations

import logging
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from greedy import STORY, chat_ids, hf_greedy
from swarm import free_port, spawn, start_coordinator, start_node, start_nodes, stop_all, wait_ready
from transformers import AutoModelForCausalLM

from torchnode.client.routing import NoRouteError
from torchnode.client.sampling import SamplingParams
from torchnode.client.session import RetryPolicy
from torchnode.client.sync_model import DistributedModel

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

STEP_TIMEOUT = 4.0
TOKENS = 64


@pytest.fixture(scope="module")
def replicas():
    """Two replicas of each half of SmolLM2; a test that kills one starts a replacement."""
    nodes = start_nodes("default", ["0:15", "0:15", "15:30", "15:30"])
    yield nodes
    stop_all(nodes)


@pytest.fixture(scope="module")
def model(replicas):
    with DistributedModel.from_pretrained("default", [n.address for n in replicas], step_timeout=STEP_TIMEOUT) as m:
        yield m


@pytest.fixture(scope="module")
def prompt(default_reference):
    return chat_ids(default_reference[1], STORY)


@pytest.fixture(scope="module")
def undisturbed(model, prompt):
    return model.generate(prompt, max_new_tokens=TOKENS, ignore_eos=True)[0, prompt.shape[1] :].tolist()


def generate_with_fault(model, prompt, nodes, fault: int, at_step: int) -> tuple[list[int], list[float], object]:
    """Greedy generation that sends `fault` to a node of the route just before step `at_step`."""
    core, loop = model.async_model, model
    session = loop.run(core.open_session(prompt.shape[1] + TOKENS))
    victim = next(n for n in nodes if n.address == random.Random(at_step).choice(session.hops).node.address)
    tokens, step_times, last = [], [], time.perf_counter()
    for new in loop.iterate(core.generate_ids(prompt, SamplingParams(max_new_tokens=TOKENS, ignore_eos=True), session)):
        now = time.perf_counter()
        tokens.append(int(new[0]))
        step_times.append(now - last)
        last = now
        if len(tokens) == at_step:
            victim.proc.send_signal(fault)
    loop.run(session.close())
    return tokens, step_times, victim


def replace(nodes: list, victim) -> None:
    victim.proc.send_signal(signal.SIGCONT)
    victim.stop(signal.SIGKILL)
    nodes[nodes.index(victim)] = start_node("default", "--blocks", f"{victim.start}:{victim.end}", port=victim.port)


def test_sigkill_mid_generation_gives_undisturbed_tokens(model, prompt, replicas, undisturbed, caplog):
    at = random.Random(1).randrange(5, TOKENS - 5)
    tokens, _, victim = generate_with_fault(model, prompt, replicas, signal.SIGKILL, at)
    assert tokens == undisturbed
    assert any("re-routing" in r.message for r in caplog.records)
    replace(replicas, victim)


def test_sigstop_hang_fails_over_within_step_timeout(model, prompt, replicas, undisturbed):
    at = random.Random(2).randrange(5, TOKENS - 5)
    tokens, step_times, victim = generate_with_fault(model, prompt, replicas, signal.SIGSTOP, at)
    assert tokens == undisturbed
    assert max(step_times[1:]) < STEP_TIMEOUT + 3.0  # detect (timeout) + re-route + replay
    replace(replicas, victim)


def test_missing_span_raises_clear_error_then_recovers(tiny_llama):
    coordinator, maddr = start_coordinator()
    nodes = [start_node(str(tiny_llama), "--initial-peers", maddr, "--blocks", span) for span in ("0:2", "2:4")]
    try:
        retry = RetryPolicy(max_attempts=3, max_seconds=5.0)
        with DistributedModel.from_pretrained(
            str(tiny_llama), initial_peers=[maddr], retry=retry, step_timeout=STEP_TIMEOUT
        ) as model:
            ids = torch.tensor([[1, 5, 9, 14]])
            expected = model.generate(ids, max_new_tokens=8)
            started = time.monotonic()
            with pytest.raises(NoRouteError, match="blocks 2:4"):
                core, loop = model.async_model, model
                session = loop.run(core.open_session(32))
                for i, _ in enumerate(loop.iterate(core.generate_ids(ids, SamplingParams(max_new_tokens=8), session))):
                    if i == 2:
                        nodes[1].stop(signal.SIGKILL)
            assert time.monotonic() - started < retry.max_seconds + STEP_TIMEOUT + 5

            nodes.append(start_node(str(tiny_llama), "--initial-peers", maddr, "--blocks", "2:4"))
            assert model.generate(ids, max_new_tokens=8).tolist() == expected.tolist()
    finally:
        stop_all(nodes)
        coordinator.stop()


def test_a_node_that_starts_signing_wrongly_mid_session_is_replaced(tiny_llama, caplog):
    """The node serving blocks 2:4 signs its replies with another key from its 6th on (a swapped key, or
    forged replies): the client refuses them, bans it, rebuilds the cache on a spare, and the tokens are
    transformers' own."""
    model = str(tiny_llama)
    ids = torch.tensor([[1, 5, 9, 14, 3, 27]])
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    expected = hf_greedy(hf, ids, 16)[0, ids.shape[1] :].tolist()
    script = str(Path(__file__).parent / "helpers" / "bad_signer_node.py")
    bad_port, spare_port = free_port(), free_port()
    nodes = start_nodes(model, ["0:2"])
    try:
        nodes.append(
            wait_ready(
                spawn(
                    [sys.executable, script, "5", "join", model, "--port", str(bad_port), "--blocks", "2:4"],
                    bad_port,
                    None,
                )
            )
        )
        peers = [nodes[0].address, nodes[1].address, f"127.0.0.1:{spare_port}"]  # the spare starts later
        with DistributedModel.from_pretrained(model, peers=peers, step_timeout=STEP_TIMEOUT) as client:
            core = client.async_model
            session = client.run(core.open_session(ids.shape[1] + 16))
            assert session.hops[-1].node.address == nodes[1].address  # the only 2:4 node up: the bad signer
            nodes.append(start_node(model, "--blocks", "2:4", port=spare_port))
            tokens = []
            with caplog.at_level(logging.WARNING):
                for new in client.iterate(core.generate_ids(ids, SamplingParams(max_new_tokens=16), session)):
                    tokens.append(int(new[0]))
            client.run(session.close())
        assert tokens == expected
        assert session.hops[-1].node.address == nodes[2].address  # the spare finished the generation
        assert any("rejected reply" in r.message and nodes[1].address in r.message for r in caplog.records)
    finally:
        stop_all(nodes)
