"""Process tier: a volunteer's node that is killed and started again with the same command keeps its identity
(the same peer id, from its key file ~/.torchnode/node-PORT.key) and takes the swarm's weakest span as the
swarm stands now, not the span it served before (its own stale record does not count as coverage)."""

from __future__ import annotations

import signal

import pytest
from swarm import start_coordinator, start_node, stop_all

pytestmark = pytest.mark.swarm


def test_a_restarted_node_keeps_its_peer_id_and_comes_back_on_the_weakest_span(tiny_llama, tmp_path):
    env = {"TORCHNODE_HOME": str(tmp_path / "home")}
    model = str(tiny_llama)
    coordinator, maddr = start_coordinator(env=env)
    swarm = ("--initial-peers", maddr)
    nodes = [coordinator]
    try:
        nodes.append(start_node(model, "--blocks", "0:4", *swarm, env=env))  # every block, once
        volunteer = start_node(model, "--num-blocks", "2", *swarm, env=env)
        nodes.append(volunteer)
        assert (volunteer.start, volunteer.end) == (0, 2)  # all blocks equally weak: the first window
        volunteer.stop(signal.SIGKILL)  # no goodbye: its record on 0:2 stays in the DHT until it expires

        nodes.append(start_node(model, "--blocks", "0:2", *swarm, env=env))  # now 2:4 is the weakest
        again = start_node(model, "--num-blocks", "2", *swarm, port=volunteer.port, env=env)
        nodes.append(again)
        assert again.peer_id == volunteer.peer_id
        assert (again.start, again.end) == (2, 4), again.log
    finally:
        stop_all(nodes)
