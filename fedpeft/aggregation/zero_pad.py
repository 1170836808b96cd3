"""HetLoRA zero-padding (Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning
of On-Device Foundation Models", sec. 3): clients get the leading r_k components; the
server averages the *full* factors zero-padded to the global rank,

    B' = Σ_k p_k [B_k, 0],   A' = Σ_k p_k [A_k; 0],

so components beyond a client's rank are pulled toward zero by every smaller client.
Inexact for the product (cross terms), and each rank is applied with its own s(r_k).
"""

from __future__ import annotations

import numpy as np

from fedpeft.aggregation.base import (
    ClientUpdate,
    LeadingCut,
    Scaling,
    State,
    average_deltas,
    module_of,
    weighted_mean,
)


class ZeroPad(LeadingCut):
    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], scaling: Scaling
    ) -> State:
        lora = [k for k in global_state if module_of(k) is not None]
        head = [k for k in global_state if module_of(k) is None]
        new = average_deltas(global_state, updates, head)
        for key in lora:
            owners = [(u.weight, u.adapters()[key]) for u in updates if key in u.delta]
            value = global_state[key]
            new[key] = (
                value if not owners else weighted_mean(owners, value.shape).astype(np.float32)
            )
        return new
