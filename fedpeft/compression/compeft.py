"""ComPEFT: sparsify and ternarize each update tensor, with optional error feedback.

ComPEFT (Yadav et al., 2023, "ComPEFT: Compression for Communicating Parameter Efficient
Updates via Sparsification and Quantization", eq. 1-2) keeps the top-k entries of a task
vector τ by magnitude and replaces each by its sign times one scale, α·σ(τ):

    τ̂ = α · σ(τ) · sign(τ) ⊙ m,   m = top-k mask of |τ|.

STC (Sattler et al., 2019, "Robust and Communication-Efficient Federated Learning from
Non-IID Data", Alg. 1) uses the mean magnitude of the kept entries as the scale instead,
which preserves the kept entries' mass; ``scale: stc`` selects it.

We apply it to each round's update Δ per tensor (ΔA, ΔB, head), never to raw LoRA
weights, where A's random init would swamp B (docs/architecture.md, known traps). Error feedback
(Seide et al., 2014; Karimireddy et al., 2019, "Error Feedback Fixes SignSGD", Alg. 2)
adds the previous round's residual e = (Δ + e_prev) − τ̂ to the next update, so nothing a
client learned is dropped for good, only delayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedpeft.compression.rice import Sparse
from fedpeft.types import State as State  # re-exported

ScaleRule = Literal["compeft", "stc"]


@dataclass(frozen=True)
class Ternary:
    """A tensor sent as scale × sign on k kept positions, zeros elsewhere."""

    shape: tuple[int, ...]
    sparse: Sparse
    scale: float

    def dense(self) -> np.ndarray:
        out = np.zeros(self.sparse.size, dtype=np.float32)
        signs = np.where(self.sparse.negative, np.float32(-1.0), np.float32(1.0))
        out[self.sparse.positions] = np.float32(self.scale) * signs
        return out.reshape(self.shape)


def rescaled(t: Ternary, factor: float) -> Ternary:
    """The same positions and signs with the scale times ``factor``."""
    return Ternary(shape=t.shape, sparse=t.sparse, scale=float(np.float32(t.scale * factor)))


def kept_count(size: int, density: float) -> int:
    """k = ⌈density · d⌉, at least one entry of a non-empty tensor."""
    return min(size, max(1, math.ceil(density * size))) if size else 0


def ternarize(
    x: np.ndarray, density: float, scale: ScaleRule = "stc", alpha: float = 1.0
) -> Ternary:
    """Top-k by magnitude, then sign × one scale (α·std(x) or STC's mean |top-k|)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).ravel()
    # never more than the non-zeros: a kept zero would travel as ±scale (sparse updates,
    # e.g. an embedding LoRA's untouched token columns, would grow entries from nothing)
    k = min(kept_count(flat.size, density), int(np.count_nonzero(flat)))
    magnitude = np.abs(flat)
    # argpartition is O(d); ties at the threshold are broken by position, deterministically
    top = np.sort(np.argpartition(-magnitude, k - 1)[:k]) if k else np.zeros(0, np.int64)
    top = top.astype(np.int64)
    if scale == "stc":
        value = float(magnitude[top].mean()) if k else 0.0
    else:
        value = alpha * float(flat.std())
    sparse = Sparse(size=flat.size, positions=top, negative=flat[top] < 0)
    return Ternary(shape=tuple(x.shape), sparse=sparse, scale=float(np.float32(value)))


def compress(
    update: State,
    residual: State,
    density: float,
    scale: ScaleRule = "stc",
    alpha: float = 1.0,
) -> tuple[dict[str, Ternary], State]:
    """Ternarize Δ + e_prev per tensor; return what is sent and the new residual e.

    Pass ``residual={}`` to run without error feedback (the returned residual is then
    what error feedback would keep, for the caller to discard).
    """
    sent: dict[str, Ternary] = {}
    new_residual: State = {}
    for key, delta in update.items():
        target = delta + residual[key] if key in residual else delta
        sent[key] = ternarize(target, density, scale, alpha)
        new_residual[key] = (target - sent[key].dense()).astype(np.float32)
    return sent, new_residual


def downlink_change(
    target: State, view: State, density: float, scale: ScaleRule = "stc", alpha: float = 1.0
) -> dict[str, Ternary]:
    """The server's compressed message for adapters ``target`` to a client that holds
    ``view``: the change, ternarized per tensor. No residual is kept: the next message is
    again the change against the view the client then holds, so what is not sent now is
    sent later (error feedback by construction)."""
    return {k: ternarize(target[k] - view[k], density, scale, alpha) for k in target}


def apply_change(view: State, change: dict[str, Ternary]) -> State:
    """The adapters a client holds after a downlink change; the server computes the same
    float32 sums, so both sides agree bit for bit."""
    return {k: (view[k] + change[k].dense()).astype(np.float32) for k in view}
