"""The server's round logic on plain objects: no Flower runtime, no simulation."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict

from fedpeft import traffic, wire
from fedpeft.config import Config, config_from_dict
from fedpeft.models import adapter_state, build_peft_model
from fedpeft.planning import plan_clients
from fedpeft.rounds import Reply, RoundStats, ServerRounds
from tests.test_golden import with_sections

NODES = {101: 0, 102: 1, 103: 2}  # node id -> partition id
NUM_LABELS = 3


def make_config(**sections: dict[str, Any]) -> Config:
    base: dict[str, Any] = {
        "seed": 3,
        "model": {"name": "tiny-bert", "max_length": 32},
        "lora": {"r": 2, "target_modules": ["query"], "layers_to_transform": [1]},
        "partition": {"num_clients": 3},
        "train": {"local_steps": 2, "batch_size": 8},
        "federation": {"min_clients": 2},
    }
    return config_from_dict(with_sections(base, **sections))


def make_rounds(**sections: dict[str, Any]) -> tuple[ServerRounds, dict[str, np.ndarray]]:
    cfg = make_config(**sections)
    fleet = plan_clients(cfg, NUM_LABELS)
    model = build_peft_model(cfg.model, fleet.global_lora, NUM_LABELS, init_seed=0)
    return ServerRounds(cfg, NUM_LABELS, dict(NODES), fleet), adapter_state(model)


def reply(rounds: ServerRounds, node: int, scale: float = 1e-2, seed: int = 0, **kw: Any) -> Reply:
    """An honest reply to what ``node`` was sent: a random update of its shapes."""
    rng = np.random.default_rng(seed + node)
    update = {
        k: rng.normal(0, scale, v.shape).astype(np.float32) for k, v in rounds.sent[node].items()
    }
    res = wire.TrainRes(update, kw.pop("num_examples", 16), kw.pop("loss", 0.5), 1.0, **kw)
    return Reply(node, content=wire.encode_train_res(res))


def test_the_sample_is_seeded_on_partitions_and_repeats() -> None:
    rounds, _ = make_rounds(federation={"fraction_train": 0.67})
    first = [rounds.sample(r, 0.67) for r in range(1, 6)]
    assert all(len(s) == 2 and set(s) <= set(NODES) for s in first)
    assert len({tuple(s) for s in first}) > 1  # the round is part of the seed
    assert first == [rounds.sample(r, 0.67) for r in range(1, 6)]
    # other node ids for the same partitions: the same partitions are drawn
    renamed = ServerRounds(rounds.cfg, NUM_LABELS, {7: 0, 5: 1, 9: 2}, plan_clients(rounds.cfg, 3))
    back = {7: 0, 5: 1, 9: 2}
    assert [sorted(back[n] for n in renamed.sample(r, 0.67)) for r in range(1, 6)] == [
        sorted(NODES[n] for n in s) for s in first
    ]
    assert rounds.sample(1, 1.0) == sorted(NODES)


def test_instructions_carry_each_plan_and_their_bytes_are_counted() -> None:
    rounds, state = make_rounds()
    contents = rounds.instructions(1, state, sorted(NODES))
    assert sorted(contents) == sorted(NODES)
    for node, content in contents.items():
        ins = wire.decode_train_ins(content)
        assert (ins.server_round, ins.partition_id) == (1, NODES[node])
        assert sorted(ins.adapters) == sorted(state) and not ins.merges
    stats = rounds.stats[1]
    assert stats.downlink_bytes == sum(traffic.record_bytes(c) for c in contents.values())
    assert stats.downlink_fp32_bytes == stats.downlink_bytes  # nothing compressed


def test_a_round_accepts_the_honest_and_says_why_it_left_out_the_others(caplog: Any) -> None:
    rounds, state = make_rounds(federation={"max_update_norm": 5.0})
    rounds.instructions(1, state, sorted(NODES))
    honest = reply(rounds, 101, loss=0.25, num_examples=16)
    replies = [
        honest,
        Reply(102, error="ValueError: out of memory"),
        reply(rounds, 101, scale=1e3),  # a second, huge reply from node 101 (norm bound)
        Reply(999, content=honest.content),  # never sent an instruction
    ]
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        new = rounds.train(1, replies)  # node 103 stays silent
    assert new is not None and new.keys() == state.keys()
    stats = rounds.stats[1]
    assert stats.clients == [0] and stats.train_loss == 0.25
    assert sorted(r["client"] for r in stats.rejected) == [-1, 0, 1, 2]
    by_client = {r["client"]: r["reason"] for r in stats.rejected}
    assert by_client[1] == "client error: ValueError: out of memory"
    assert by_client[2] == "no reply within 3600 s"
    assert "exceeds max_update_norm 5" in by_client[0]
    assert by_client[-1] == "a reply from a node that was sent no instruction"
    assert "rejected the update of client 1 (node 102)" in caplog.text
    # FedIT: the new global adapters are the old ones plus the one accepted update
    assert honest.content is not None
    delta = wire.decode_train_res(honest.content, rounds.sent[101], 16).update
    for k in state:
        np.testing.assert_allclose(new[k], state[k] + delta[k], rtol=1e-6, atol=1e-7)


def test_no_valid_update_leaves_the_global_adapters() -> None:
    rounds, state = make_rounds()
    rounds.instructions(1, state, sorted(NODES))
    assert rounds.train(1, [Reply(n, error="boom") for n in NODES]) is None
    assert len(rounds.stats[1].rejected) == 3 and rounds.final == {}


def test_the_training_loss_is_weighted_by_examples() -> None:
    stats = RoundStats()
    stats.add_loss(1.0, 10)
    stats.add_loss(4.0, 30)
    assert stats.train_loss == pytest.approx(3.25)


def test_user_level_dp_reclips_what_a_client_did_not_and_spends_epsilon() -> None:
    rounds, state = make_rounds(
        privacy={"mode": "user", "noise_multiplier": 0.5, "clip_norm": 0.1, "noise_seed": 0}
    )
    rounds.instructions(1, state, sorted(NODES))
    huge = reply(rounds, 101, scale=10.0)
    assert huge.content is not None
    res = wire.decode_train_res(huge.content, rounds.sent[101], 16)
    bounded = res
    for stage in rounds.stages.reply:  # as accept() applies them
        bounded = stage(bounded)
    norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in bounded.update.values()))
    assert norm == pytest.approx(0.1, rel=1e-5)  # clipped to C, whatever the client sent
    assert rounds.train(1, [reply(rounds, n, scale=10.0) for n in NODES]) is not None
    assert rounds.stats[1].epsilon is not None and rounds.stats[1].epsilon > 0
    saved = rounds.export_state()
    again, _ = make_rounds(
        privacy={"mode": "user", "noise_multiplier": 0.5, "clip_norm": 0.1, "noise_seed": 0}
    )
    again.restore_state(saved, completed_rounds=1)
    assert again.round_offset == 1 and again.history == rounds.history
    assert again.noise_rng.random() == rounds.noise_rng.random()


def test_downlink_sends_changes_to_the_view_a_node_holds_until_it_is_rejected() -> None:
    rounds, state = make_rounds(compression={"density": 0.5, "downlink": True})
    first = rounds.instructions(1, state, sorted(NODES))
    assert all(wire.decode_train_ins(c).downlink is None for c in first.values())
    rounds.train(1, [reply(rounds, 101), reply(rounds, 102), Reply(103, error="gone")])
    moved = {k: v + 0.01 for k, v in state.items()}
    second = {
        n: wire.decode_train_ins(c) for n, c in rounds.instructions(2, moved, sorted(NODES)).items()
    }
    assert second[101].downlink is not None and second[101].adapters == {}
    assert (second[101].base_view, second[101].view) == (0, 1)
    assert second[103].downlink is None and second[103].adapters  # its view was dropped
    assert rounds.stats[2].downlink_bytes < rounds.stats[2].downlink_fp32_bytes


def test_client_evaluations_are_averaged_by_examples() -> None:
    rounds, state = make_rounds()
    rounds.instructions(1, state, sorted(NODES))
    replies = [
        Reply(101, content=wire.encode_eval_res(10, {"accuracy": 1.0})),
        Reply(102, content=wire.encode_eval_res(30, {"accuracy": 0.0})),
        Reply(103, content=RecordDict()),  # undecodable
    ]
    assert rounds.evaluation(1, replies) == {"accuracy": 0.25}
    assert [r["client"] for r in rounds.stats[1].rejected] == [2]
    assert rounds.evaluation(1, [Reply(101, error="x")]) is None
