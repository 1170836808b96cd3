"""Server-side helpers that need no Flower run."""

from __future__ import annotations

from server.app import assign_partitions


def test_declared_partitions_are_kept_and_the_rest_filled() -> None:
    # node 5 declares 1, node 7 declares nothing (-1), node 9 repeats 1, node 11 is out of range
    got = assign_partitions({5: 1, 7: -1, 9: 1, 11: 40}, num_clients=4)
    assert got == {5: 1, 7: 0, 9: 2, 11: 3}


def test_more_nodes_than_partitions_leaves_the_extra_out() -> None:
    assert assign_partitions({1: -1, 2: -1, 3: -1}, num_clients=2) == {1: 0, 2: 1}
