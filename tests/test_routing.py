import random

import pytest

from torchnode.client.routing import Candidate, NoRouteError, find_route


def test_fewest_hops_when_equal_speed():
    route = find_route([Candidate("a", 0, 15, 10), Candidate("b", 15, 30, 10), Candidate("c", 0, 30, 10)], 30)
    assert [(h.key, h.start, h.end) for h in route] == [("c", 0, 30)]


def test_fast_nodes_beat_a_slow_full_replica():
    route = find_route([Candidate("a", 0, 15, 100), Candidate("b", 15, 30, 100), Candidate("slow", 0, 30, 1)], 30)
    assert [h.key for h in route] == ["a", "b"]


def test_rtt_counts():
    route = find_route([Candidate("far", 0, 4, 100, rtt=1.0), Candidate("near", 0, 4, 100, rtt=0.001)], 4)
    assert route[0].key == "near"


def test_overlapping_spans_start_late():
    route = find_route([Candidate("a", 0, 20, 10), Candidate("b", 10, 30, 10)], 30)
    assert [(h.key, h.start, h.end) for h in route] == [("a", 0, 20), ("b", 20, 30)]


def test_sub_range_can_end_early():
    route = find_route([Candidate("full", 0, 30, 10)], 15, start=5)
    assert [(h.key, h.start, h.end) for h in route] == [("full", 5, 15)]


def test_missing_blocks_are_named():
    with pytest.raises(NoRouteError, match="15:20"):
        find_route([Candidate("a", 0, 15, 10), Candidate("b", 20, 30, 10)], 30)


def test_equal_replicas_share_clients():
    candidates = [Candidate("r1", 0, 4, 10), Candidate("r2", 0, 4, 10)]
    picks = {find_route(candidates, 4, rng=random.Random(seed))[0].key for seed in range(20)}
    assert picks == {"r1", "r2"}


def test_nearly_equal_replicas_share_clients_but_a_clearly_better_one_wins():
    near = [Candidate("r1", 0, 4, 10, rtt=0.010), Candidate("r2", 0, 4, 10, rtt=0.0105)]
    assert {find_route(near, 4, rng=random.Random(seed))[0].key for seed in range(30)} == {"r1", "r2"}
    far = [Candidate("fast", 0, 4, 10, rtt=0.001), Candidate("slow", 0, 4, 10, rtt=0.5)]
    assert {find_route(far, 4, rng=random.Random(seed))[0].key for seed in range(30)} == {"fast"}
