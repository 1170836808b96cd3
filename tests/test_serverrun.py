"""Who takes part in a run (fedpeft/serverrun.py), from the nodes' answers alone."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from fedpeft import declaration
from fedpeft.config import LoraConfig
from fedpeft.planning import FleetPlan
from fedpeft.serverrun import assign_partitions, discovery, plan_summary, trainable_partitions


def test_declared_partitions_are_kept_and_the_rest_filled() -> None:
    # node 5 declares 1, node 7 declares nothing (-1), node 9 repeats 1, node 11 is out of range
    got = assign_partitions({5: 1, 7: -1, 9: 1, 11: 40}, num_clients=4)
    assert got == {5: 1, 7: 0, 9: 2, 11: 3}


def test_more_nodes_than_partitions_leaves_the_extra_out() -> None:
    assert assign_partitions({1: -1, 2: -1, 3: -1}, num_clients=2) == {1: 0, 2: 1}


def test_discovery_keeps_declared_profiles_and_leaves_out_bad_answers(caplog: Any) -> None:
    answers = {
        4: declaration.encode_profile({"partition-id": 1, "device": "phone", "memory-mb": 20}),
        2: declaration.encode_profile({}),  # declares nothing: takes a free partition
        6: declaration.encode_profile({"partition-id": 0, "memory-mb": -1}),  # malformed
        8: None,  # did not answer
    }
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        found = discovery(answers, num_clients=3)
    assert found.partitions == {2: 0, 4: 1}
    assert list(found.profiles) == [1] and found.profiles[1].name == "phone"
    assert "node 6 declares a malformed device profile" in caplog.text
    assert "node 8 did not answer the query" in caplog.text


def test_nodes_whose_profile_cannot_train_are_dropped_and_too_few_end_the_run(
    caplog: Any,
) -> None:
    fleet = FleetPlan({0: LoraConfig()}, LoraConfig(), {}, left_out={1: "too small"})
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        assert trainable_partitions({10: 0, 11: 1}, fleet, min_clients=1) == {10: 0}
    assert "node 11 (client 1) takes no part: too small" in caplog.text
    with pytest.raises(RuntimeError, match="Only 1 clients can train"):
        trainable_partitions({10: 0, 11: 1}, fleet, min_clients=2)


def test_a_plan_summary_names_its_layers_and_highest_rank() -> None:
    lora = LoraConfig(r=4, layers_to_transform=(1, 2), rank_pattern={"layer.2": 8})
    assert plan_summary(lora) == {"layers": [1, 2], "max_rank": 8, "rank_pattern": {"layer.2": 8}}
    assert plan_summary(LoraConfig(r=4))["layers"] is None
