"""Clipping and Gaussian noise on a client's whole update (all its tensors as one vector).

User-level DP-FedAvg (McMahan et al., 2018, Alg. 1): each client clips its update Δ to
L2 norm C, Δ̃ = Δ · min(1, C / ‖Δ‖); the server sums the clipped updates with uniform
weights, adds N(0, (zC)²) per coordinate to the sum and divides by the number of clients
sampled. Local DP adds the noise on the client instead. Heterogeneous shapes need no
special care: the norm is over whatever tensors the client sends.
"""

from __future__ import annotations

import numpy as np

from fedpeft.types import State as State  # re-exported


def global_norm(update: State) -> float:
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))
    )


def clip(update: State, clip_norm: float) -> tuple[State, float]:
    """Δ · min(1, C / ‖Δ‖) and the norm before clipping; the result's norm is ≤ C."""
    norm = global_norm(update)
    if norm <= clip_norm:
        return update, norm
    # float32 rounding can leave the product a hair above C: aim a little below it
    factor = np.float32(clip_norm / norm * (1 - 1e-6))
    return {k: (v * factor).astype(np.float32) for k, v in update.items()}, norm


def gaussian_noise(update: State, std: float, rng: np.random.Generator) -> State:
    """The update plus i.i.d. N(0, std²) on every coordinate."""
    return {
        k: (v + rng.normal(0.0, std, size=v.shape)).astype(np.float32) for k, v in update.items()
    }


def dp_fedavg(
    global_state: State,
    deltas: list[State],
    clip_norm: float,
    noise_multiplier: float,
    sampled: int,
    rng: np.random.Generator,
    server_lr: float = 1.0,
) -> State:
    """x + η (Σ_k Δ̃_k + N(0, (zC)²)) / m, McMahan et al. (2018), Alg. 1 with uniform
    weights: the Δ̃_k are already clipped to C, and m is the number of clients sampled
    (not the number that replied), so a dropped client changes nothing but the sum."""
    out = {}
    for key, x in global_state.items():
        total = np.zeros(x.shape, dtype=np.float64)
        for delta in deltas:
            total += delta[key]
        noise = rng.normal(0.0, noise_multiplier * clip_norm, size=x.shape)
        out[key] = (x + server_lr * (total + noise) / sampled).astype(np.float32)
    return out
