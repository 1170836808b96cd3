"""Server optimizers (fedpeft.aggregation.serveropt): FedAvg's step is the old one bit for
bit; FedAvgM and FedAdam follow their update rules by hand; heavy ball damps the
period-2 oscillation of a step that overshoots; the buffers survive a checkpoint."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from fedpeft.aggregation import server_step
from fedpeft.aggregation.serveropt import ServerOptimizer
from fedpeft.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpeft.config import ConfigError, load_config


def _state(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32)}


def test_sgd_is_fedavg_with_a_server_learning_rate() -> None:
    old, agg = _state(1.0, 2.0), _state(1.5, 0.0)
    assert ServerOptimizer("sgd", 1.0).step(old, agg) is agg
    np.testing.assert_array_equal(
        ServerOptimizer("sgd", 0.3).step(old, agg)["w"], server_step(old, agg, 0.3)["w"]
    )


def test_momentum_accumulates_the_pseudo_gradients() -> None:
    opt = ServerOptimizer("momentum", lr=0.5, momentum=0.8)
    x = opt.step(_state(0.0), _state(1.0))  # m = 1, x = 0.5
    np.testing.assert_allclose(x["w"], [0.5])
    x = opt.step(x, _state(1.5))  # Δ = 1.0, m = 0.8 + 1.0, x = 0.5 + 0.9
    np.testing.assert_allclose(x["w"], [1.4], rtol=1e-6)
    assert x["w"].dtype == np.float32


def test_adam_takes_a_normalized_step() -> None:
    opt = ServerOptimizer("adam", lr=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    x = opt.step(_state(0.0, 0.0), _state(4.0, -0.01))
    # m = 0.1 Δ, v = 0.01 Δ²: the step is η 0.1 Δ / (0.1 |Δ| + τ), about η sign(Δ) when |Δ| ≫ τ
    expected = [0.1 * 0.4 / (0.4 + 1e-3), 0.1 * -0.001 / (0.001 + 1e-3)]
    np.testing.assert_allclose(x["w"], expected, rtol=1e-6)


def _error_after(opt: ServerOptimizer, curvature: float, rounds: int) -> list[float]:
    """|x| on f(x) = h x² / 2 when a round's aggregate is the gradient step x − h x."""
    x, path = _state(1.0), []
    for _ in range(rounds):
        x = opt.step(x, {"w": x["w"] - curvature * x["w"]})
        path.append(float(x["w"][0]))
    return path


def test_heavy_ball_damps_the_oscillation_of_an_overshooting_step() -> None:
    fedavg = _error_after(ServerOptimizer("sgd", 1.0), curvature=1.8, rounds=20)
    assert all(a * b < 0 for a, b in itertools.pairwise(fedavg))  # period 2
    heavy = _error_after(ServerOptimizer("momentum", 0.5, momentum=0.5), 1.8, 20)
    assert abs(heavy[-1]) < 0.1 * abs(fedavg[-1])  # 0.707²⁰ against 0.8²⁰
    # √β per round whatever the curvature in [(1 − √β)² / η, (1 + √β)² / η] = [0.17, 5.8],
    # also where FedAvg diverges (η h > 2)
    assert abs(_error_after(ServerOptimizer("sgd", 1.0), 2.2, 40)[-1]) > 1.0
    for h in (0.2, 1.8, 2.2, 4.0):
        path = _error_after(ServerOptimizer("momentum", 0.5, momentum=0.5), h, 40)
        assert abs(path[-1]) < 4 * 0.5 ** (40 / 2)  # up to a polynomial factor


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_buffers_survive_a_checkpoint(tmp_path: Path, name: str) -> None:
    opt = ServerOptimizer(name, 0.1)
    x = opt.step(_state(0.0, 1.0), _state(1.0, 0.5))
    save_checkpoint(tmp_path, Checkpoint(1, {}, x, {}, {}, opt.state()))
    resumed = ServerOptimizer(name, 0.1)
    resumed.load(load_checkpoint(tmp_path).buffers)
    np.testing.assert_array_equal(
        resumed.step(x, _state(2.0, 0.0))["w"], opt.step(x, _state(2.0, 0.0))["w"]
    )


def test_a_checkpoint_without_buffers_loads_empty(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, Checkpoint(1, {}, _state(1.0), {}, {}))
    assert load_checkpoint(tmp_path).buffers == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.server_optimizer=nesterov"], "should be one of sgd, momentum, adam"),
        (
            ["federation.server_optimizer=momentum", "federation.aggregator=flexlora"],
            "'flexlora' re-factorizes or restarts them",
        ),
        (["federation.server_momentum=1.0"], "should be in \\[0, 1\\)"),
        (["federation.server_tau=0"], "'federation.server_tau' should be positive"),
    ],
)
def test_config_mistakes_are_one_sentence(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Path(__file__).parents[1] / "configs" / "mr.yaml", overrides)
