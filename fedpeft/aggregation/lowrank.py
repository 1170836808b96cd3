"""Exact aggregation of LoRA products and its re-factorization (FlexLoRA; Bai et al.,
2024, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", eq. 4-5).

The aggregate of one adapted weight over clients k with weights p_k, LoRA scalings
s_k = alpha / r_k and factors B_k (m × r_k), A_k (r_k × n) is

    ΔW = Σ_k p_k s_k B_k A_k = B_s A_s,
    B_s = [p_1 s_1 B_1, …, p_K s_K B_K]  (m × R),   A_s = [A_1; …; A_K]  (R × n),

with R = Σ r_k. Its SVD comes from two thin QRs and the SVD of an R × R core, in
O((m + n) R²) time and O((m + n) R) memory; the m × n matrix is never formed:

    B_s = Q_b R_b,  A_sᵀ = Q_a R_a,  R_b R_aᵀ = U_c Σ V_cᵀ  ⇒  ΔW = (Q_b U_c) Σ (Q_a V_c)ᵀ.

When R ≥ min(m, n) the stacked factors are no smaller than the matrix itself, so
:func:`aggregate_svd` then accumulates the m × n sum one client at a time instead: either
way memory stays O((m + n) · min(R, max(m, n))) and time linear in the clients.

A client of rank r and scaling s gets the best rank-r approximation (Eckart–Young) split
so that s B A equals it: B = U_r Σ_r / s and A = V_rᵀ. A's rows stay orthonormal, so no
component is ever zero in both factors (which would stop it from learning).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LowRankTerm:
    """One client's adapter on one weight: p_k, s_k, B_k (m × r), A_k (r × n)."""

    weight: float
    scaling: float
    lora_b: np.ndarray
    lora_a: np.ndarray


@dataclass(frozen=True)
class ThinSVD:
    """ΔW = U diag(S) Vt with U (m × q), S (q,), Vt (q × n), q ≤ min(m, n, R)."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray

    def dense(self) -> np.ndarray:
        return np.asarray((self.u * self.s) @ self.vt)


def stack_terms(terms: list[LowRankTerm]) -> tuple[np.ndarray, np.ndarray]:
    """B_s (m × R) and A_s (R × n) with Σ_k p_k s_k B_k A_k = B_s A_s."""
    b_s = np.concatenate(
        [t.weight * t.scaling * t.lora_b.astype(np.float64) for t in terms], axis=1
    )
    a_s = np.concatenate([t.lora_a.astype(np.float64) for t in terms], axis=0)
    return b_s, a_s


def svd_of_product(b_s: np.ndarray, a_s: np.ndarray) -> ThinSVD:
    """SVD of B_s A_s through QR of both factors and an SVD of the small core."""
    q_b, r_b = np.linalg.qr(b_s)  # (m × q1), (q1 × R)
    q_a, r_a = np.linalg.qr(a_s.T)  # (n × q2), (q2 × R)
    u_c, s, vt_c = np.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (q1 × q2)
    return ThinSVD(u=q_b @ u_c, s=s, vt=vt_c @ q_a.T)


def svd_dense(b_s: np.ndarray, a_s: np.ndarray) -> ThinSVD:
    """Reference route: form the m × n product and take its SVD."""
    u, s, vt = np.linalg.svd(b_s @ a_s, full_matrices=False)
    return ThinSVD(u=u, s=s, vt=vt)


def svd_accumulated(terms: list[LowRankTerm]) -> ThinSVD:
    """Σ_k p_k s_k B_k A_k accumulated into the m × n sum, then its SVD.

    Clients are stacked in chunks of about min(m, n) rank, one GEMM per chunk: time is
    linear in the clients and memory stays O((m + n) · min(m, n)) however many there are
    (one product and one m × n addition per client would cost ~2× the time at 1,000).
    """
    m, n = terms[0].lora_b.shape[0], terms[0].lora_a.shape[1]
    total = np.zeros((m, n))
    for chunk in _rank_chunks(terms, min(m, n)):
        b_s, a_s = stack_terms(chunk)
        total += b_s @ a_s
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    return ThinSVD(u=u, s=s, vt=vt)


def _rank_chunks(terms: list[LowRankTerm], max_rank: int) -> list[list[LowRankTerm]]:
    """Consecutive groups of terms whose stacked rank reaches at most ``max_rank`` (a
    single term of higher rank forms its own group)."""
    chunks: list[list[LowRankTerm]] = [[]]
    rank = 0
    for t in terms:
        r = t.lora_a.shape[0]
        if chunks[-1] and rank + r > max_rank:
            chunks.append([])
            rank = 0
        chunks[-1].append(t)
        rank += r
    return chunks


def aggregate_svd(terms: list[LowRankTerm]) -> ThinSVD:
    """SVD of the weighted product sum by the cheaper exact route for these shapes."""
    m, n = terms[0].lora_b.shape[0], terms[0].lora_a.shape[1]
    stacked_rank = sum(t.lora_a.shape[0] for t in terms)
    if stacked_rank < min(m, n):
        return svd_of_product(*stack_terms(terms))
    return svd_accumulated(terms)


def refactor(svd: ThinSVD, rank: int, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of a rank-``rank`` adapter with scaling s whose s B A is the truncated SVD.

    Where the aggregate has fewer than ``rank`` components, B gets zero columns and A
    random orthonormal rows (orthogonal to the others), so those components can learn.
    """
    m, n = svd.u.shape[0], svd.vt.shape[1]
    q = min(rank, len(svd.s))
    lora_b = np.zeros((m, rank))
    lora_a = np.zeros((rank, n))
    lora_b[:, :q] = svd.u[:, :q] * (svd.s[:q] / scaling)
    lora_a[:q] = svd.vt[:q]
    if q < rank:
        lora_a[q:] = _orthonormal_complement(svd.vt[:q], rank - q, n)
    return lora_b, lora_a


def _orthonormal_complement(rows: np.ndarray, count: int, n: int) -> np.ndarray:
    """``count`` orthonormal rows orthogonal to ``rows`` (deterministic)."""
    rng = np.random.default_rng(count * 7919 + n)
    draw = rng.normal(size=(n, count))
    if len(rows):
        draw -= rows.T @ (rows @ draw)
    q, _ = np.linalg.qr(draw)
    return np.asarray(q.T[:count])
