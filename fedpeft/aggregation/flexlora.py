"""FlexLoRA (Bai et al., 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", eq. 4-5): aggregate the exact products and
re-factorize them per client rank.

Per adapted module, with the global product W = s_g B A and the clients k that trained
the module (weights p_k normalized over them, scalings s_k = s(r_k), alpha / r_k unless
``lora.scaling`` says otherwise), the new global product is the old one moved by the
clients' exact product updates:

    W' = W + Σ_k p_k (s_k B'_k A'_k − s_k B_k A_k),

where (B_k, A_k) is the cut client k received and (B'_k, A'_k) what it trained from it.
A client that received the whole global rank holds s_k B_k A_k = W exactly, so its term
collapses to p_k s_k B'_k A'_k; when every client does, W' = Σ_k p_k s_k B'_k A'_k is
FlexLoRA's eq. 4. A client of lower rank received only the best rank-r_k part of W:
averaging its *whole* product, as eq. 4 does, would pull W toward rank r_k in proportion
to p_k each round (with phones at rank 1-2 holding a third of the weight, the global
adapter loses most of its components every round). Adding its *change* instead keeps
what it could not see.

All terms are low-rank, so :func:`fedpeft.aggregation.lowrank.aggregate_svd` takes the
SVD of their sum from the stacked factors (QR route; the dense m × n matrix is never
formed while the stacked rank is smaller). The result is stored as the rank-R global
factors with scaling s_g = s(R) in SVD order: s_g B A = U_R Σ_R V_Rᵀ. A client of
rank r gets the leading r components rescaled by s_g / s_r, so that s_r B_r A_r is
exactly the best rank-r approximation of the aggregate. The head is averaged (FedAvg).
"""

from __future__ import annotations

import numpy as np

from fedpeft.aggregation.base import (
    LORA_B,
    ClientUpdate,
    Scaling,
    State,
    average_deltas,
    lora_keys,
    module_of,
    owner_shares,
    truncate,
)
from fedpeft.aggregation.lowrank import LowRankTerm, aggregate_svd, refactor


class FlexLoRA:
    def cut(
        self, global_state: State, shapes: dict[str, tuple[int, ...]], scaling: Scaling
    ) -> State:
        out = truncate(global_state, shapes)
        for key, shape in shapes.items():
            if LORA_B in key:
                ratio = scaling(global_state[key].shape[1]) / scaling(shape[1])  # s_g / s_r
                out[key] = (out[key] * ratio).astype(np.float32)
        return out

    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], scaling: Scaling
    ) -> State:
        head = [k for k in global_state if module_of(k) is None]
        new = average_deltas(global_state, updates, head)
        modules = sorted({m for k in global_state if (m := module_of(k)) is not None})
        for module in modules:
            key_a, key_b = lora_keys(module)
            terms = product_update_terms(global_state, updates, module, scaling)
            if not terms:
                new[key_a], new[key_b] = global_state[key_a], global_state[key_b]
                continue
            rank = global_state[key_a].shape[0]
            lora_b, lora_a = refactor(aggregate_svd(terms), rank, scaling(rank))
            new[key_a], new[key_b] = lora_a.astype(np.float32), lora_b.astype(np.float32)
        return new


def product_update_terms(
    global_state: State, updates: list[ClientUpdate], module: str, scaling: Scaling
) -> list[LowRankTerm]:
    """Low-rank terms whose sum is W + Σ_k p_k (s_k B'_k A'_k − s_k B_k A_k) for one module
    (empty when no client trained it)."""
    key_a, key_b = lora_keys(module)
    owners = owner_shares(updates, key_a)
    if not owners:
        return []
    rank = global_state[key_a].shape[0]
    terms, global_share = [], 1.0
    for u, p in owners:
        after = u.adapters()
        r = after[key_a].shape[0]
        terms.append(LowRankTerm(p, scaling(r), after[key_b], after[key_a]))
        if r == rank:  # its cut was the whole global product: p_k W cancels with W's share
            global_share -= p
        else:
            terms.append(LowRankTerm(-p, scaling(r), u.sent[key_b], u.sent[key_a]))
    if abs(global_share) > 1e-12:
        g_a, g_b = global_state[key_a], global_state[key_b]
        terms.append(LowRankTerm(global_share, scaling(rank), g_b, g_a))
    return terms
