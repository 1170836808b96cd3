"""FlexLoRA (Bai et al., 2024): aggregate the exact products and re-factorize.

Per adapted module, over the clients k that trained it:

    ΔW = Σ_k p_k s_k B_k A_k,   s_k = alpha / r_k,

by :func:`fedpeft.aggregation.lowrank.aggregate_svd` (the QR route, never the dense
m × n matrix, when the stacked rank is smaller than the matrix), then stored as the rank-R global factors with scaling
s_g = alpha / R in SVD order: s_g B A = U_R Σ_R V_Rᵀ. A client of rank r gets the
leading r components rescaled by s_g / s_r, so that s_r B_r A_r is exactly the best
rank-r approximation of the aggregate. The head is averaged (FedAvg).
"""

from __future__ import annotations

import numpy as np

from fedpeft.aggregation.base import (
    ClientUpdate,
    State,
    average_deltas,
    lora_keys,
    module_of,
    truncate,
)
from fedpeft.aggregation.lowrank import LowRankTerm, aggregate_svd, refactor


class FlexLoRA:
    def cut(self, global_state: State, shapes: dict[str, tuple[int, ...]], alpha: float) -> State:
        out = truncate(global_state, shapes)
        for key, shape in shapes.items():
            if ".lora_B." in key:
                r_client, r_global = shape[1], global_state[key].shape[1]
                out[key] = (out[key] * (r_client / r_global)).astype(np.float32)  # s_g / s_r
        return out

    def aggregate(self, global_state: State, updates: list[ClientUpdate], alpha: float) -> State:
        head = [k for k in global_state if module_of(k) is None]
        new = average_deltas(global_state, updates, head)
        modules = sorted({m for k in global_state if (m := module_of(k)) is not None})
        adapters = [(u, u.adapters()) for u in updates]
        for module in modules:
            key_a, key_b = lora_keys(module)
            terms = [
                LowRankTerm(u.weight, alpha / a[key_a].shape[0], a[key_b], a[key_a])
                for u, a in adapters
                if key_a in a
            ]
            if not terms:
                new[key_a], new[key_b] = global_state[key_a], global_state[key_b]
                continue
            total = sum(t.weight for t in terms)
            terms = [LowRankTerm(t.weight / total, t.scaling, t.lora_b, t.lora_a) for t in terms]
            rank = global_state[key_a].shape[0]
            lora_b, lora_a = refactor(aggregate_svd(terms), rank, alpha / rank)
            new[key_a], new[key_b] = lora_a.astype(np.float32), lora_b.astype(np.float32)
        return new
