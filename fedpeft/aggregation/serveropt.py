"""Server optimizers on the adapters: FedOpt (Reddi et al., 2021, "Adaptive Federated
Optimization", Algorithm 2) and FedAvgM (Hsu et al., 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", Sec. 3).

The combiner's aggregate minus the global adapters is a pseudo-gradient Δ_t, and the
server moves the global adapters x by an optimizer step on it (element-wise, float64):

- ``sgd``:      x ← x + η Δ_t                                   (FedAvg at η = 1)
- ``momentum``: m ← β m + Δ_t;  x ← x + η m                      (FedAvgM)
- ``adam``:     m ← β₁ m + (1 − β₁) Δ_t;  v ← β₂ v + (1 − β₂) Δ_t²;
                x ← x + η m / (√v + τ)                            (FedAdam, no bias correction)

Why momentum helps against a step that overshoots (a period-2 oscillation of the global
model): on a quadratic of curvature h per round, FedAvg's error contracts by |1 − η h|
and grows once η h > 2, while heavy ball contracts by √β for every h in
[(1 − √β)² / η, (1 + √β)² / η] (Polyak, 1964); η = β = 0.5 covers h from 0.17 to 5.8.

The buffers are per tensor of the global adapters, so they only mean something for a
combiner whose factors keep their basis from round to round (``fedit``, ``zero_pad``,
``rbla``):
an aggregator that re-factorizes by SVD rotates the factors each round, and FLoRA
restarts them. :data:`MOMENTUM_AGGREGATORS` names the ones that may use a buffer.
"""

from __future__ import annotations

import numpy as np

from fedpeft.aggregation.base import server_step
from fedpeft.types import State

OPTIMIZERS = ("sgd", "momentum", "adam")
MOMENTUM_AGGREGATORS = ("fedit", "zero_pad", "rbla")


class ServerOptimizer:
    """One of :data:`OPTIMIZERS` with its buffers (``m``: the first moment or velocity,
    ``v``: Adam's second moment), which :meth:`state` and :meth:`load` carry through a
    checkpoint."""

    def __init__(
        self, name: str, lr: float, momentum: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"Unknown server optimizer {name!r}; expected one of {OPTIMIZERS}.")
        self.name, self.lr, self.momentum, self.beta2, self.tau = name, lr, momentum, beta2, tau
        self.m: State = {}
        self.v: State = {}

    @property
    def stateful(self) -> bool:
        return self.name != "sgd"

    def step(self, old: State, aggregate: State) -> State:
        """The new global adapters from the old ones and the combiner's aggregate."""
        if self.name == "sgd":
            return server_step(old, aggregate, self.lr)
        return {k: self._step(k, old[k], aggregate[k]).astype(old[k].dtype) for k in old}

    def _step(self, key: str, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        delta = new.astype(np.float64) - old
        m = self.m.get(key, np.zeros_like(delta))
        assert m.shape == delta.shape, f"{key}: buffer {m.shape}, adapters {delta.shape}"
        if self.name == "momentum":
            self.m[key] = self.momentum * m + delta
            return old + self.lr * self.m[key]
        v = self.v.get(key, np.zeros_like(delta))
        self.m[key] = self.momentum * m + (1 - self.momentum) * delta
        self.v[key] = self.beta2 * v + (1 - self.beta2) * delta**2
        return old + self.lr * self.m[key] / (np.sqrt(self.v[key]) + self.tau)

    def state(self) -> State:
        """The buffers, as ``m/<key>`` and ``v/<key>``."""
        return {
            **{f"m/{k}": a for k, a in self.m.items()},
            **{f"v/{k}": a for k, a in self.v.items()},
        }

    def load(self, state: State) -> None:
        self.m = {k[2:]: np.asarray(a, np.float64) for k, a in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(a, np.float64) for k, a in state.items() if k.startswith("v/")}
