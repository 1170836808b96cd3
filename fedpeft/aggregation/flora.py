"""FLoRA (Wang et al., 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", sec. 3.2, eq. 5): stack the clients' adapters, merge
the exact product into the base weights, restart the adapters.

Per adapted module, over the clients k that trained it (p_k normalized over them, LoRA
scaling s_k), the round's update is the exact weighted product written as one stacked
low-rank pair

    ΔW_t = Σ_k p_k s_k B_k A_k = B_s A_s,
    B_s = [p_1 s_1 B_1, …, p_K s_K B_K]  (m × Σ r_k),   A_s = [A_1; …; A_K]  (Σ r_k × n).

Nothing is truncated, whatever the ranks, so FLoRA is exact; the price is that (B_s, A_s)
grows with the number of clients and must reach every client, which merges it into its
base weights (W ← W + ΔW_t) before it trains again. Each round the clients restart from
the same adapters: the run's initial A and B = 0, so their whole trained product is their
update. The head is averaged (FedAvg).
"""

from __future__ import annotations

import numpy as np

from fedpeft.aggregation.base import (
    ClientUpdate,
    LeadingCut,
    Scaling,
    State,
    average_deltas,
    lora_keys,
    module_of,
    owner_shares,
)
from fedpeft.aggregation.lowrank import LowRankTerm, stack_terms


class FLoRA(LeadingCut):
    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], scaling: Scaling
    ) -> State:
        """The restart adapters (unchanged LoRA factors) with the averaged head."""
        head = [k for k in global_state if module_of(k) is None]
        return {**global_state, **average_deltas(global_state, updates, head)}

    def stack(self, global_state: State, updates: list[ClientUpdate], scaling: Scaling) -> State:
        """(B_s, A_s) per module under its LoRA keys, p_k s_k folded into B_s (so that
        ΔW_t = B_s A_s); modules no client trained are absent."""
        modules = sorted({m for k in global_state if (m := module_of(k)) is not None})
        out: State = {}
        for module in modules:
            key_a, key_b = lora_keys(module)
            owners = [(p, u.adapters()) for u, p in owner_shares(updates, key_a)]
            if not owners:
                continue
            terms = [
                LowRankTerm(p, scaling(a[key_a].shape[0]), a[key_b], a[key_a]) for p, a in owners
            ]
            b_s, a_s = stack_terms(terms)
            out[key_b], out[key_a] = b_s.astype(np.float32), a_s.astype(np.float32)
        return out


def merge_stacks(base_delta: State, stacks: list[State], scale: float = 1.0) -> State:
    """Σ_t scale · B_s A_s added to the dense per-module ΔW in ``base_delta`` (keyed by
    module name); returns a new dict."""
    out = dict(base_delta)
    for stack in stacks:
        for module in sorted({m for k in stack if (m := module_of(k)) is not None}):
            key_a, key_b = lora_keys(module)
            product = scale * (stack[key_b].astype(np.float64) @ stack[key_a])  # (m × n)
            previous = out.get(module)
            out[module] = (product if previous is None else previous + product).astype(np.float32)
    return out
