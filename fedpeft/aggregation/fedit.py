"""FedIT (Zhang et al., 2024, "Towards Building the Federated GPT"): FedAvg of the LoRA
factors, A and B averaged separately.

    A' = A + Σ_k p_k ΔA_k,   B' = B + Σ_k p_k ΔB_k,   p_k = n_k / Σ_j n_j

This is *inexact* for the product: mean(B_k) mean(A_k) ≠ mean(B_k A_k); the difference is
the cross terms Σ_{j≠k} p_j p_k B_j A_k. Each tensor is averaged over the clients that
sent it, so layers trained by no client keep their previous value.
"""

from __future__ import annotations

import numpy as np

from fedpeft.aggregation.base import ClientUpdate, State


def aggregate_fedit(global_state: State, updates: list[ClientUpdate]) -> State:
    new_state = {}
    for key, value in global_state.items():
        owners = [u for u in updates if key in u.delta]
        total = sum(u.weight for u in owners)
        if not owners or total <= 0:
            new_state[key] = value
            continue
        mean_delta = sum((u.weight / total) * u.delta[key].astype(np.float64) for u in owners)
        new_state[key] = (value + mean_delta).astype(value.dtype)
    return new_state
