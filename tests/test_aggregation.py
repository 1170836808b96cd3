"""FedIT aggregation with golden numbers."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.aggregation import AGGREGATORS, ClientUpdate, get_aggregator
from fedpeft.aggregation.fedit import aggregate_fedit


def test_weighted_mean_golden() -> None:
    g = {"w": np.array([1.0, 1.0], np.float32)}
    ups = [
        ClientUpdate(0, {"w": np.array([1.0, 0.0], np.float32)}, 1),
        ClientUpdate(1, {"w": np.array([4.0, 3.0], np.float32)}, 3),
    ]
    # 1 + (1*1 + 3*4)/4 = 4.25 ; 1 + (0 + 9)/4 = 3.25
    np.testing.assert_allclose(aggregate_fedit(g, ups)["w"], [4.25, 3.25])


def test_unowned_layers_keep_their_value() -> None:
    g = {"l0": np.ones(3, np.float32), "l1": np.full(3, 7.0, np.float32)}
    ups = [ClientUpdate(0, {"l0": np.ones(3, np.float32)}, 10)]
    out = aggregate_fedit(g, ups)
    np.testing.assert_allclose(out["l0"], 2.0)
    np.testing.assert_array_equal(out["l1"], g["l1"])


def test_fedit_error_is_the_cross_terms() -> None:
    """mean(B) mean(A) − mean(B A) = Σ_jk p_j p_k B_j A_k − Σ_k p_k B_k A_k."""
    rng = np.random.default_rng(0)
    bs = [rng.normal(size=(6, 2)) for _ in range(3)]
    as_ = [rng.normal(size=(2, 5)) for _ in range(3)]
    p = np.array([0.2, 0.3, 0.5])
    g = {"A": np.zeros((2, 5)), "B": np.zeros((6, 2))}
    ups = [ClientUpdate(k, {"A": as_[k], "B": bs[k]}, p[k]) for k in range(3)]
    out = aggregate_fedit(g, ups)
    naive = out["B"] @ out["A"]
    exact = sum(p[k] * bs[k] @ as_[k] for k in range(3))
    cross = sum(p[j] * p[k] * bs[j] @ as_[k] for j in range(3) for k in range(3) if j != k)
    diag_shrink = sum((p[k] ** 2 - p[k]) * bs[k] @ as_[k] for k in range(3))
    np.testing.assert_allclose(naive - exact, cross + diag_shrink, atol=1e-12)
    assert np.abs(naive - exact).max() > 0.1  # and it is not small


def test_registry() -> None:
    assert get_aggregator("fedit") is AGGREGATORS["fedit"]
    with pytest.raises(ValueError, match="Unknown aggregator"):
        get_aggregator("nope")


def test_server_step_scales_the_move() -> None:
    from fedpeft.aggregation import server_step

    old, agg = {"w": np.array([1.0, 2.0])}, {"w": np.array([2.0, 0.0])}
    np.testing.assert_allclose(server_step(old, agg, 2.0)["w"], [3.0, -2.0])
    assert server_step(old, agg, 1.0) is agg
