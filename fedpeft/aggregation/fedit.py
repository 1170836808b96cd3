"""FedIT (Zhang et al., 2024, "Towards Building the Federated GPT"): FedAvg of the LoRA
factors, A and B averaged separately.

    A' = A + Σ_k p_k ΔA_k,   B' = B + Σ_k p_k ΔB_k,   p_k = n_k / Σ_j n_j

This is *inexact* for the product: mean(B_k) mean(A_k) ≠ mean(B_k A_k); the difference is
the cross terms Σ_{j≠k} p_j p_k B_j A_k. With heterogeneous ranks a client gets the
leading r_k components and its Δ is zero-padded; each tensor is averaged over the clients
that sent it, so layers trained by no client keep their previous value.
"""

from __future__ import annotations

from fedpeft.aggregation.base import ClientUpdate, LeadingCut, Scaling, State, average_deltas


class FedIT(LeadingCut):
    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], scaling: Scaling
    ) -> State:
        return average_deltas(global_state, updates, list(global_state))


def aggregate_fedit(global_state: State, updates: list[ClientUpdate]) -> State:
    return FedIT().aggregate(global_state, updates, scaling=lambda r: 1.0)
