"""Canary membership audit: the Gaussian-DP conversion, and on DP-FedAvg itself the
empirical ε grows as the noise shrinks and stays below the accountant's ε."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from fedpeft.audit.membership import CanaryAudit, empirical_epsilon, gdp_epsilon
from fedpeft.privacy import accounting
from fedpeft.privacy.accounting import Entry
from fedpeft.privacy.mechanisms import clip, dp_fedavg


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
def test_gdp_epsilon_solves_the_tradeoff_equation(mu: float) -> None:
    eps = gdp_epsilon(mu, 1e-5)
    delta = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    assert delta == pytest.approx(1e-5, rel=1e-6)
    assert gdp_epsilon(0.0, 1e-5) == 0.0


def test_indistinguishable_canaries_give_zero() -> None:
    rng = np.random.default_rng(0)
    assert empirical_epsilon(rng.normal(size=500), rng.normal(size=500), 1e-5) < 0.5


def _dp_fedavg_run(
    z: float, rounds: int = 5, clients: int = 20, canaries: int = 64
) -> tuple[dict[str, float], float]:
    """Canary estimate and accountant ε of a DP-FedAvg run on a 2,000-parameter model."""
    rng = np.random.default_rng(1)
    state = {"w": np.zeros((40, 50), np.float32)}
    audit = CanaryAudit(state, canaries, clip_norm=1.0, q=1.0, seed=3)
    drift = rng.normal(size=(40, 50))  # what real clients agree on
    for _ in range(rounds):
        updates = [clip({"w": drift + rng.normal(size=(40, 50))}, 1.0)[0] for _ in range(clients)]
        extra = audit.this_round()
        state = dp_fedavg(state, updates + extra, 1.0, z, clients + len(extra), rng)
    bound = accounting.epsilon([Entry(z, 1.0, rounds)], 1e-5)
    return audit.estimate(state, 1e-5), bound


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0, 4.0])
def test_the_lower_bound_never_exceeds_the_accountants_epsilon(z: float) -> None:
    estimate, bound = _dp_fedavg_run(z)
    assert estimate["epsilon_lower_bound"] <= min(estimate["empirical_epsilon"], bound)


def test_canaries_show_more_with_less_noise() -> None:
    loud, _ = _dp_fedavg_run(z=0.5)
    quiet, _ = _dp_fedavg_run(z=4.0)
    assert quiet["empirical_epsilon"] < loud["empirical_epsilon"]
    assert loud["epsilon_lower_bound"] > 5.0  # at z = 0.5 the canaries stand out clearly
