"""Unit tier: what a client believes of a node's speed (client/speed_book.py): measured beats claimed, a
fair trial for nodes without history, and the gap that makes a session re-route around a hop."""

from __future__ import annotations

import random

import pytest

from torchnode.client.routing import Candidate, find_route
from torchnode.client.speed_book import SpeedBook, SpeedPolicy


def test_claims_stand_until_something_is_measured():
    book = SpeedBook()
    liar = Candidate("liar", 0, 30, 1000.0)
    assert book.believed(liar).throughput == pytest.approx(1000.0)


def test_measured_speed_replaces_the_claim_after_trust_steps():
    book = SpeedBook(SpeedPolicy(trust_steps=4))
    liar = Candidate("liar", 0, 30, 1000.0)  # claims 1 ms per step over its 30 blocks
    book.observe(liar)
    book.record("liar", 30, 0.25)  # one step: blended, still better than measured
    assert 4.0 < book.believed(liar).throughput < 1000.0
    for _ in range(3):
        book.record("liar", 30, 0.25)
    assert book.believed(liar).throughput == pytest.approx(4.0)  # 0.25 s per step over the span
    assert book.far_slower("liar", 30)


def test_routing_leaves_a_measured_liar_for_an_honest_chain():
    book = SpeedBook()
    liar, a, b = Candidate("liar", 0, 30, 1000.0), Candidate("a", 0, 15, 40.0), Candidate("b", 15, 30, 40.0)
    for c in (liar, a, b):
        book.observe(c)
    assert [h.key for h in find_route([book.believed(c) for c in (liar, a, b)], 30)] == ["liar"]  # the claim wins
    for _ in range(4):
        book.record("liar", 30, 0.25)
    # the liar does not set the bar for untried nodes: the honest chain keeps its claims and wins
    routes = {
        tuple(h.key for h in find_route([book.believed(c) for c in (liar, a, b)], 30, rng=random.Random(s)))
        for s in range(10)
    }
    assert routes == {("a", "b")}


def test_an_untried_node_gets_a_fair_trial_capped_at_the_median_measured():
    book = SpeedBook()
    honest = [Candidate(f"h{i}", 0, 10, 20.0) for i in range(3)]
    for c, seconds in zip(honest, (0.04, 0.05, 0.06), strict=True):
        book.observe(c)
        for _ in range(4):
            book.record(c.key, 10, seconds)
    fresh = Candidate("fresh", 0, 10, 1e6)  # announces a million tokens/s
    assert book.believed(fresh).throughput == pytest.approx(1 / 0.05)  # the median measured node's speed
    slow_claim = Candidate("modest", 0, 10, 5.0)  # a claim below the median stands as it is
    assert book.believed(slow_claim).throughput == pytest.approx(5.0)


def test_an_honest_node_with_overheads_is_not_far_slower():
    book = SpeedBook()
    node = Candidate("tiny", 0, 4, 2000.0)  # 0.5 ms per step announced; the wire adds a few ms
    book.observe(node)
    for _ in range(5):
        book.record("tiny", 4, 0.004)
    assert not book.far_slower("tiny", 4)


def test_measuring_off_trusts_announcements():
    book = SpeedBook(SpeedPolicy(measure=False))
    liar = Candidate("liar", 0, 30, 1000.0)
    book.observe(liar)
    for _ in range(5):
        book.record("liar", 30, 0.25)
    assert book.believed(liar).throughput == 1000.0 and not book.far_slower("liar", 30)


def test_stale_measurements_are_forgotten(monkeypatch):
    book = SpeedBook(SpeedPolicy(forget_after=60.0))
    liar = Candidate("liar", 0, 30, 1000.0)
    book.observe(liar)
    for _ in range(4):
        book.record("liar", 30, 0.25)
    import torchnode.client.speed_book as speed_book

    later = speed_book.time.monotonic() + 61.0
    monkeypatch.setattr(speed_book.time, "monotonic", lambda: later)
    assert book.believed(liar).throughput == pytest.approx(1000.0)  # a new trial


def test_bad_policies_are_refused():
    with pytest.raises(ValueError):
        SpeedPolicy(reroute_gap=0.5)
    with pytest.raises(ValueError):
        SpeedPolicy(trust_steps=0)
