"""Membership audit of user-level DP with canary clients (Andrew et al., 2024, "One-shot
Empirical Privacy Estimation for Federated Learning", Alg. 2).

k canary clients each send the same random direction c_i (norm C, as a clipped update)
every round they take part. After training, the cosine between the final model change
Δ = θ_T − θ_0 and each inserted canary is compared with the cosine to k fresh random
directions that were never inserted. Modelling both as Gaussians with a common spread
σ, the separation μ = (mean_inserted − mean_fresh) / σ is a μ-Gaussian-DP mechanism
(Dong, Roth and Su, 2019), whose ε at δ is (Cor. 2.13)

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2).

That ε estimates what the final model reveals about one client; with μ lowered by two
standard errors (√(1/k + 1/k)) it is a lower bound at about 97.7% confidence, to set
beside the accountant's ε, an upper bound over every round's release.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from fedpeft.wire import State


def canary_updates(shapes: State, count: int, clip_norm: float, seed: int) -> list[State]:
    """``count`` random directions over the adapters, each of norm C."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        draw = {k: rng.normal(size=v.shape) for k, v in sorted(shapes.items())}
        norm_ = math.sqrt(sum(float(np.sum(d**2)) for d in draw.values()))
        out.append({k: (d * clip_norm / norm_).astype(np.float32) for k, d in draw.items()})
    return out


def cosines(change: State, directions: list[State]) -> np.ndarray:
    keys = sorted(change)
    flat = np.concatenate([change[k].astype(np.float64).ravel() for k in keys])
    out = []
    for d in directions:
        v = np.concatenate([d[k].astype(np.float64).ravel() for k in keys])
        out.append(float(flat @ v / max(np.linalg.norm(flat) * np.linalg.norm(v), 1e-30)))
    return np.asarray(out)


def gdp_epsilon(mu: float, delta: float) -> float:
    """ε of μ-GDP at δ (0 when μ ≤ 0)."""
    if mu <= 0:
        return 0.0

    def excess(eps: float) -> float:
        return (
            float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))
            - delta
        )

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2
    return float(brentq(excess, 0.0, high))


def separation(inserted: np.ndarray, fresh: np.ndarray) -> tuple[float, float]:
    """μ = (mean_inserted − mean_fresh) / σ_pooled, and its standard error."""
    spread = math.sqrt((float(np.var(inserted)) + float(np.var(fresh))) / 2)
    mu = (float(np.mean(inserted)) - float(np.mean(fresh))) / max(spread, 1e-30)
    return mu, math.sqrt(1 / len(inserted) + 1 / len(fresh))


def empirical_epsilon(
    inserted: np.ndarray, fresh: np.ndarray, delta: float, z_score: float = 0.0
) -> float:
    """ε from the canary cosines (inserted vs never inserted): the point estimate, or
    with ``z_score`` > 0 a one-sided lower confidence bound (μ − z_score · SE)."""
    mu, standard_error = separation(inserted, fresh)
    return gdp_epsilon(mu - z_score * standard_error, delta)


class CanaryAudit:
    """The server side of the audit: canaries inserted into DP-FedAvg's sum each round
    (each with probability q, the clients' sampling rate), and the estimate at the end."""

    def __init__(self, initial: State, count: int, clip_norm: float, q: float, seed: int) -> None:
        self.initial = initial
        self.inserted = canary_updates(initial, count, clip_norm, seed)
        self.fresh = canary_updates(initial, count, clip_norm, seed + 1)
        self.q = q
        self.rng = np.random.default_rng(seed + 2)

    def this_round(self) -> list[State]:
        if self.q >= 1:
            return list(self.inserted)
        return [c for c in self.inserted if self.rng.random() < self.q]

    def estimate(self, final: State, delta: float) -> dict[str, float]:
        change = {k: final[k].astype(np.float64) - self.initial[k] for k in self.initial}
        inserted, fresh = cosines(change, self.inserted), cosines(change, self.fresh)
        return {
            "canaries": len(self.inserted),
            "cosine_inserted": float(np.mean(inserted)),
            "cosine_fresh": float(np.mean(fresh)),
            "empirical_epsilon": empirical_epsilon(inserted, fresh, delta),
            # 97.7% one-sided: the estimate has sampling error of ~1/sqrt(canaries)
            "epsilon_lower_bound": empirical_epsilon(inserted, fresh, delta, z_score=2.0),
        }
