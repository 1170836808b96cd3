"""Byzantine-robust aggregation on the exact LoRA products: coordinate-wise median and
trimmed mean (Yin et al., 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", Alg. 1 and 2).

Per adapted module, each client that trained it contributes its exact product change
ΔW_k = s_k (B'_k A'_k − B_k A_k) (m × n, as in :mod:`fedpeft.aggregation.flexlora`).
The aggregate moves W by the coordinate-wise median of the ΔW_k, or by their β-trimmed
mean, which drops the ⌊βK⌋ largest and smallest values of every coordinate before
averaging. The head's deltas are combined the same way. The new W is re-factorized to
the global rank by SVD and cut per client like FlexLoRA's.

Both are unweighted, since a client's claimed example count is exactly what an attacker
would inflate. With fewer than 2β K + 1 honest clients, neither guarantees anything.
They hold K dense m × n matrices per module at once, which is fine for fleets of tens of
clients on MiniLM-sized layers but not for thousands.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedpeft.aggregation.base import (
    ClientUpdate,
    Scaling,
    State,
    lora_keys,
    module_of,
    pad_to,
    product,
)
from fedpeft.aggregation.flexlora import FlexLoRA
from fedpeft.aggregation.lowrank import ThinSVD, refactor

Combine = Callable[[np.ndarray], np.ndarray]  # (K, ...) -> (...)


def coordinate_median(stack: np.ndarray) -> np.ndarray:
    return np.asarray(np.median(stack, axis=0))


def trimmed_mean(beta: float) -> Combine:
    def combine(stack: np.ndarray) -> np.ndarray:
        # imported here: scipy.stats costs about 1 s, and every ClientApp process
        # imports this package (its registry calls trimmed_mean)
        from scipy import stats

        return np.asarray(stats.trim_mean(stack, beta, axis=0))

    return combine


class RobustProduct(FlexLoRA):
    """FlexLoRA's cut and re-factorization around a robust combination of the product
    changes."""

    def __init__(self, combine: Combine) -> None:
        self.combine = combine

    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], scaling: Scaling
    ) -> State:
        new: State = {}
        for key in (k for k in global_state if module_of(k) is None):  # the head
            deltas = [
                pad_to(u.delta[key], global_state[key].shape) for u in updates if key in u.delta
            ]
            step = self.combine(np.stack(deltas)) if deltas else 0.0
            new[key] = (global_state[key] + step).astype(np.float32)
        for module in sorted({m for k in global_state if (m := module_of(k)) is not None}):
            key_a, key_b = lora_keys(module)
            rank = global_state[key_a].shape[0]
            changes = product_changes(updates, module, scaling)
            if not changes:
                new[key_a], new[key_b] = global_state[key_a], global_state[key_b]
                continue
            w = product(global_state, module, scaling)
            u, s, vt = np.linalg.svd(w + self.combine(np.stack(changes)), full_matrices=False)
            lora_b, lora_a = refactor(ThinSVD(u, s, vt), rank, scaling(rank))
            new[key_a], new[key_b] = lora_a.astype(np.float32), lora_b.astype(np.float32)
        return new


def product_changes(updates: list[ClientUpdate], module: str, scaling: Scaling) -> list[np.ndarray]:
    """ΔW_k = s_k (B'_k A'_k − B_k A_k) of every client that trained ``module``."""
    key_a, key_b = lora_keys(module)
    out = []
    for u in (u for u in updates if key_a in u.delta):
        after = u.adapters()
        s = scaling(after[key_a].shape[0])
        before = u.sent[key_b].astype(np.float64) @ u.sent[key_a]
        out.append(s * (after[key_b].astype(np.float64) @ after[key_a] - before))
    return out
