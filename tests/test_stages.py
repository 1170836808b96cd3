"""The round's stages (fedpeft/stages.py): which ones a config builds, in which order,
and what each one does to plain states, without a simulation."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from fedpeft import client, stages, wire
from fedpeft.aggregation import ClientUpdate
from fedpeft.config import config_from_dict
from fedpeft.privacy.mechanisms import global_norm
from tests.test_golden import with_sections

BASE: dict[str, Any] = {
    "model": {"name": "tiny-bert", "max_length": 32},
    "lora": {"r": 2},
    "partition": {"num_clients": 4},
    "federation": {"min_clients": 2},
}


def names(found: Any) -> list[str]:
    return [type(s).__name__ for s in found]


@pytest.mark.parametrize(
    ("sections", "client_stages", "reply_stages", "round_stages"),
    [
        ({}, ["Train"], [], ["Aggregate", "ServerStep"]),
        (
            {"privacy": {"mode": "user", "noise_multiplier": 1.0}, "compression": {"density": 0.1}},
            ["Train", "Clip", "Compress", "ReclipSent", "RedactMetrics"],
            ["CentralReclip"],
            ["NoisySum", "ServerStep"],
        ),
        (
            {
                "privacy": {"mode": "local", "noise_multiplier": 1.0},
                "compression": {"density": 0.1},
            },
            ["LocalBudget", "Train", "Clip", "LocalNoise", "Compress", "RedactMetrics"],
            [],
            ["Aggregate", "ServerStep"],
        ),
        (
            {"privacy": {"mode": "record", "noise_multiplier": 1.0}},
            ["DPSGD", "RedactMetrics"],
            [],
            ["Aggregate", "ServerStep"],
        ),
        (
            {
                "federation": {"aggregator": "flora", "max_update_norm": 5.0},
                "audit": {"tap_every": 2},
            },
            ["Train"],
            ["NormGate"],
            ["FloraLedger", "AuditObserver", "Aggregate", "ServerStep"],
        ),
    ],
)
def test_the_builder_picks_the_stages_in_order(
    sections: dict[str, Any],
    client_stages: list[str],
    reply_stages: list[str],
    round_stages: list[str],
) -> None:
    cfg = config_from_dict(with_sections(BASE, **sections))
    built = stages.build(cfg, num_nodes=4)
    assert names(built.client) == client_stages
    assert names(built.reply) == reply_stages
    assert names(built.round) == round_stages
    assert names(stages.build(cfg).client) == client_stages  # a client needs no nodes
    assert stages.build(cfg).round == ()


def test_only_downlink_compression_keeps_views_on_the_nodes() -> None:
    plain = config_from_dict(with_sections(BASE, compression={"density": 0.2}))
    views = config_from_dict(with_sections(BASE, compression={"density": 0.2, "downlink": True}))
    assert stages.build(plain, 4).downlink is None
    assert stages.build(views, 4).downlink is not None


def test_downlink_views_send_changes_to_a_view_the_server_mirrors() -> None:
    views = config_from_dict(with_sections(BASE, compression={"density": 0.5, "downlink": True}))
    downlink = stages.build(views, 4).downlink
    assert downlink is not None

    def ins(value: list[float]) -> wire.TrainIns:
        return wire.TrainIns(1, "{}", 2, {"a": np.array(value, np.float32)}, "{}", 0)

    first, held = downlink(7, ins([1.0, 2.0, 3.0, 4.0]))
    assert first.downlink is None and first.view == 0  # no view yet: fp32
    second, held = downlink(7, ins([1.0, 2.0, 3.0, 9.0]))
    assert second.adapters == {} and second.downlink is not None
    assert (second.base_view, second.view) == (0, 1)
    # the node's view moved toward the target only where the change was sent
    assert held["a"][3] > 4.0 and np.array_equal(held["a"][:3], [1.0, 2.0, 3.0])
    on_node = client.received_adapters(second, 0, first.adapters)
    np.testing.assert_array_equal(on_node.adapters["a"], held["a"])  # bit for bit
    downlink.forget(7)  # a rejected reply: the view is unknown
    third, _ = downlink(7, ins([1.0, 2.0, 3.0, 9.0]))
    assert third.downlink is None and third.view == 2


def _res(update: dict[str, np.ndarray]) -> wire.TrainRes:
    return wire.TrainRes(update, 16, 0.5, 1.0, load_seconds=0.1, startup_seconds=0.2)


def test_the_norm_gate_rejects_with_the_norm_and_the_reclip_bounds() -> None:
    long = _res({"a": np.full(4, 3.0, dtype=np.float32)})  # norm 6
    with pytest.raises(wire.UpdateRejected, match="update norm 6 exceeds max_update_norm 5"):
        stages.NormGate(5.0)(long)
    assert stages.NormGate(7.0)(long) is long
    assert global_norm(stages.CentralReclip(1.5)(long).update) == pytest.approx(1.5, rel=1e-5)


def _outgoing(**sections: dict[str, Any]) -> stages.Outgoing:
    cfg = config_from_dict(with_sections(BASE, **sections))
    ins = wire.TrainIns(3, cfg.to_json(), 2, {}, "{}", partition_id=1)
    out = stages.Outgoing(ins, cfg, {}, client.Kept())
    return dataclasses.replace(out, res=_res({"a": np.full(4, 3.0, dtype=np.float32)}))


def test_clip_noise_and_redaction_act_on_the_reply_only() -> None:
    out = _outgoing(privacy={"mode": "local", "noise_multiplier": 0.5, "noise_seed": 1})
    clipped = stages.Clip(2.0)(out)
    assert global_norm(clipped.reply.update) == pytest.approx(2.0, rel=1e-5)
    noised = stages.LocalNoise(2.0)(clipped)
    again = stages.LocalNoise(2.0)(clipped)  # seeded per (round, client): it repeats
    assert not np.allclose(noised.reply.update["a"], clipped.reply.update["a"])
    np.testing.assert_array_equal(noised.reply.update["a"], again.reply.update["a"])
    redacted = stages.RedactMetrics()(noised).reply
    assert redacted.train_loss is None and redacted.load_seconds is None
    assert redacted.num_examples == out.cfg.train.local_steps * out.cfg.train.batch_size


def test_compression_keeps_the_residual_and_the_reclip_moves_the_excess_into_it() -> None:
    out = _outgoing(compression={"density": 0.5, "error_feedback": True})
    update = {"a": np.array([3.0, -2.0, 0.1, 0.05], dtype=np.float32)}
    out = dataclasses.replace(out, res=_res(update))
    sent = stages.Compress(error_feedback=True)(out)
    assert sent.reply.compressed is not None and set(sent.residual) == {"a"}
    kept = sent.reply.update["a"] != 0
    assert kept.sum() == 2  # the two largest of four at density 0.5
    reclipped = stages.ReclipSent(1.0)(sent)
    assert global_norm(reclipped.reply.update) <= 1.0
    # error feedback: what was not sent stays in the residual, so nothing is lost
    total = reclipped.reply.update["a"] + reclipped.residual["a"]
    np.testing.assert_allclose(total, update["a"], atol=1e-5)


def _one_round(server_lr: float, privacy: dict[str, Any]) -> np.ndarray:
    sections = {"federation": {"server_lr": server_lr, "min_clients": 2}, "privacy": privacy}
    built = stages.build(config_from_dict(with_sections(BASE, **sections)), 2)
    x = {"lora_A.weight": np.ones((2, 3), dtype=np.float32)}
    updates = [
        ClientUpdate(i, {"lora_A.weight": np.full((2, 3), d, np.float32)}, 1)
        for i, d in enumerate([1.0, 3.0])
    ]
    step = stages.RoundInput(1, x, updates, [0, 1])
    for stage in built.round:
        stage(step)
    assert step.aggregate is not None
    return step.aggregate["lora_A.weight"]


def test_the_server_step_follows_either_combiner() -> None:
    np.testing.assert_allclose(_one_round(0.5, {}), 1.0 + 0.5 * 2.0)  # x + η mean(Δ)
    # DP-FedAvg: the same noise (noise_seed), then the same step from x = 1
    user = {"mode": "user", "noise_multiplier": 1.0, "clip_norm": 5.0, "noise_seed": 3}
    full, half = _one_round(1.0, user), _one_round(0.5, user)
    assert not np.allclose(full, 3.0)  # noised
    np.testing.assert_allclose(half, 1.0 + 0.5 * (full - 1.0), rtol=1e-6)


def test_the_accountant_steps_at_user_level_and_reports_clients_otherwise() -> None:
    user = config_from_dict(with_sections(BASE, privacy={"mode": "user", "noise_multiplier": 1.0}))
    acc = stages.build(user, 4).accountant
    assert acc is not None
    first = acc.step()
    assert first is not None and 0 < first < (acc.step() or 0)  # ε grows with the rounds
    record = config_from_dict(
        with_sections(BASE, privacy={"mode": "record", "noise_multiplier": 1.0})
    )
    acc = stages.build(record, 4).accountant
    assert acc is not None
    acc.client_epsilon.update({0: 0.3, 1: 0.7})
    assert acc.step() == 0.7
    none = stages.build(config_from_dict(BASE), 4).accountant
    assert none is not None and none.step() is None


@pytest.mark.parametrize(
    ("sections", "reason"),
    [
        ({}, None),
        ({"compression": {"density": 0.1, "error_feedback": False}}, None),
        ({"compression": {"density": 0.1}}, "error-feedback residuals"),
        (
            {"compression": {"density": 0.1, "error_feedback": False, "downlink": True}},
            "downlink views",
        ),
        ({"privacy": {"mode": "record", "noise_multiplier": 1.0}}, "'record' accountants"),
        ({"privacy": {"mode": "local", "noise_multiplier": 1.0}}, "'local' accountants"),
        ({"federation": {"aggregator": "flora"}}, "FLoRA's merged updates"),
        ({"privacy": {"mode": "user", "noise_multiplier": 1.0, "canaries": 2}}, "canary audit"),
        ({"privacy": {"mode": "user", "noise_multiplier": 1.0}}, None),
    ],
)
def test_stages_say_whether_a_resume_can_continue_them(
    sections: dict[str, Any], reason: str | None
) -> None:
    found = stages.build(config_from_dict(with_sections(BASE, **sections)), 4).resume_problem()
    assert (found is None) if reason is None else (found is not None and reason in found)
