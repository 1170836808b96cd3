"""Types shared by aggregators."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's decoded update for a round.

    Args:
        client_id: the client (partition) id; stable across runs.
        delta: adapters_after − adapters_received, per exchanged tensor.
        weight: aggregation weight (the number of examples trained on).
    """

    client_id: int
    delta: State
    weight: float


def server_step(old: State, aggregate: State, server_lr: float) -> State:
    """x + η_s (aggregate − x): the server optimizer step of FedOpt with plain SGD."""
    if server_lr == 1.0:
        return aggregate
    return {k: (old[k] + server_lr * (aggregate[k] - old[k])).astype(old[k].dtype) for k in old}
