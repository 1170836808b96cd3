"""Rank-based LoRA aggregation (RBLA; Chen et al., 2024, "RBLA: Rank-Based-LoRA-Aggregation
for Fine-tuning Heterogeneous Models in FLaaS", arXiv 2408.08699, sec. 3): each rank
component of a factor is averaged over the clients that own it,

    A'[i, :] = A[i, :] + Σ_{k: r_k > i} p_k^(i) ΔA_k[i, :],   p_k^(i) = w_k / Σ_{j: r_j > i} w_j

(columns of B alike). FedIT zero-pads a rank-r_k client's Δ to the global rank and
averages over every client that sent the tensor, so the components only the high-rank
clients own move by a fraction of their update, as if the others had voted for no
change; here they move by the mean of their owners' updates. Equal ranks give FedIT
exactly. Like FedIT it is inexact for the product (cross terms), and each component is
averaged as a raw factor whatever s(r_k) its owners applied it with. The factors keep
their basis from round to round, so a server optimizer's buffers apply.
"""

from __future__ import annotations

import numpy as np

from fedpeft.aggregation.base import ClientUpdate, LeadingCut, Scaling, State


class RBLA(LeadingCut):
    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], scaling: Scaling
    ) -> State:
        return {key: owner_mean(key, value, updates) for key, value in global_state.items()}


def owner_mean(key: str, value: np.ndarray, updates: list[ClientUpdate]) -> np.ndarray:
    """x + the weighted mean of the Δ_k over the clients whose leading block holds each
    entry; an entry no client holds keeps its value."""
    total = np.zeros(value.shape, np.float64)
    weight = np.zeros(value.shape, np.float64)
    for u in updates:
        if key not in u.delta:
            continue
        block = tuple(slice(0, s) for s in u.delta[key].shape)
        total[block] += u.weight * u.delta[key]
        weight[block] += u.weight
    owned = weight > 0
    new = value.astype(np.float64)
    new[owned] += total[owned] / weight[owned]
    return new.astype(value.dtype)
