from torchnode.node.block_selection import better_start, choose_start
from torchnode.protocol.dht.coverage import coverage


def test_empty_swarm_starts_at_zero():
    assert choose_start(coverage([], 30), 10) == 0


def test_takes_the_uncovered_window():
    cov = coverage([(0, 10, 5.0), (20, 30, 5.0)], 30)
    assert choose_start(cov, 10) == 10


def test_takes_the_weakest_covered_window():
    cov = coverage([(0, 15, 10.0), (15, 30, 2.0)], 30)
    assert choose_start(cov, 15) == 15


def test_ties_go_to_fewest_servers():
    cov = coverage([(0, 10, 5.0), (0, 10, 5.0), (10, 20, 10.0), (20, 30, 10.0)], 30)  # 0:10 has 2 servers
    assert choose_start(cov, 10) in (10, 20)
    cov = coverage([(0, 10, 4.0), (0, 10, 4.0), (10, 20, 8.0), (20, 30, 8.0), (20, 30, 0.0)], 30)
    assert choose_start(cov, 10) == 10  # 10:20 and 20:30 tie on tokens/s; 10:20 has fewer servers


def test_window_longer_than_model_is_clamped():
    assert choose_start(coverage([], 4), 10) == 0


def test_move_to_cover_a_gap():
    others = coverage([(0, 10, 5.0), (10, 20, 5.0)], 30)  # 20:30 uncovered, we sit on 0:10 as a replica
    assert better_start(others, 0, 10, 5.0, threshold=0.25) == 20


def test_stay_when_gain_is_below_threshold():
    others = coverage([(0, 10, 10.0), (10, 20, 11.0), (20, 30, 10.0)], 30)
    assert better_start(others, 0, 10, 1.0, threshold=0.25) is None


def test_move_when_gain_is_above_threshold():
    others = coverage([(0, 10, 10.0), (10, 20, 2.0), (20, 30, 10.0)], 30)
    assert better_start(others, 0, 10, 10.0, threshold=0.25) == 10
