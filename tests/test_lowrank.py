"""Exact product aggregation and re-factorization (FlexLoRA) with golden checks."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.aggregation.lowrank import (
    LowRankTerm,
    refactor,
    stack_terms,
    svd_dense,
    svd_of_product,
)

RNG = np.random.default_rng(0)


def _terms(ranks: list[int], m: int = 12, n: int = 9, alpha: float = 16.0) -> list[LowRankTerm]:
    weights = RNG.dirichlet(np.ones(len(ranks)))
    return [
        LowRankTerm(float(p), alpha / r, RNG.normal(size=(m, r)), RNG.normal(size=(r, n)))
        for p, r in zip(weights, ranks, strict=True)
    ]


def _dense_sum(terms: list[LowRankTerm]) -> np.ndarray:
    return sum(t.weight * t.scaling * t.lora_b @ t.lora_a for t in terms)  # type: ignore[return-value]


@pytest.mark.parametrize("ranks", [[2], [2, 4, 8], [1, 3, 5, 2], [8, 8, 8]])
def test_stacked_qr_svd_equals_dense_weighted_sum(ranks: list[int]) -> None:
    terms = _terms(ranks)
    svd = svd_of_product(*stack_terms(terms))
    np.testing.assert_allclose(svd.dense(), _dense_sum(terms), atol=1e-10)


def test_qr_route_equals_dense_svd() -> None:
    b_s, a_s = stack_terms(_terms([2, 4]))
    qr, dense = svd_of_product(b_s, a_s), svd_dense(b_s, a_s)
    k = 6  # the product has rank 6
    np.testing.assert_allclose(qr.s[:k], dense.s[:k], rtol=1e-10)
    np.testing.assert_allclose(np.abs(qr.u[:, :k].T @ dense.u[:, :k]), np.eye(k), atol=1e-8)


def test_stacked_rank_beyond_the_matrix_size() -> None:
    """R = Σ r_k may exceed min(m, n): QR then returns square factors, still exact."""
    terms = _terms([8] * 5, m=10, n=7)
    np.testing.assert_allclose(
        svd_of_product(*stack_terms(terms)).dense(), _dense_sum(terms), atol=1e-9
    )


@pytest.mark.parametrize(("rank", "alpha"), [(2, 16.0), (4, 8.0), (12, 16.0)])
def test_refactor_respects_scaling_and_is_the_best_approximation(rank: int, alpha: float) -> None:
    terms = _terms([4, 4, 4])  # product of rank 12 on a 12 x 9 matrix: rank 9
    svd = svd_of_product(*stack_terms(terms))
    scaling = alpha / rank
    lora_b, lora_a = refactor(svd, rank, scaling)
    assert lora_b.shape == (12, rank) and lora_a.shape == (rank, 9)
    approx = scaling * lora_b @ lora_a
    u, s, vt = np.linalg.svd(_dense_sum(terms))
    q = min(rank, 9)
    np.testing.assert_allclose(approx, (u[:, :q] * s[:q]) @ vt[:q], atol=1e-9)
    if rank <= 9:  # A's rows are orthonormal, so none is ever zero
        np.testing.assert_allclose(lora_a @ lora_a.T, np.eye(rank), atol=1e-9)


def test_refactor_of_a_zero_aggregate_keeps_a_learnable() -> None:
    terms = [LowRankTerm(1.0, 2.0, np.zeros((6, 2)), RNG.normal(size=(2, 5)))]
    lora_b, lora_a = refactor(svd_of_product(*stack_terms(terms)), 3, 2.0)
    np.testing.assert_allclose(lora_b, 0.0, atol=1e-12)
    np.testing.assert_allclose(lora_a @ lora_a.T, np.eye(3), atol=1e-9)


@pytest.mark.parametrize("ranks", [[2, 3], [8] * 4])  # stacked rank below / above min(m, n)
def test_aggregate_svd_picks_an_exact_route(ranks: list[int]) -> None:
    from fedpeft.aggregation.lowrank import aggregate_svd, svd_accumulated

    terms = _terms(ranks, m=12, n=9)
    np.testing.assert_allclose(aggregate_svd(terms).dense(), _dense_sum(terms), atol=1e-9)
    np.testing.assert_allclose(svd_accumulated(terms).dense(), _dense_sum(terms), atol=1e-9)


@pytest.mark.parametrize(
    ("ranks", "limit", "groups"),
    [([2, 3, 4], 5, [[2, 3], [4]]), ([8, 1], 4, [[8], [1]]), ([1] * 5, 9, [[1] * 5])],
)
def test_accumulation_chunks_respect_the_rank_limit(
    ranks: list[int], limit: int, groups: list[list[int]]
) -> None:
    from fedpeft.aggregation.lowrank import _rank_chunks

    chunks = _rank_chunks(_terms(ranks), limit)
    assert [[t.lora_a.shape[0] for t in c] for c in chunks] == groups


def test_accumulated_route_is_exact_across_many_chunks() -> None:
    from fedpeft.aggregation.lowrank import svd_accumulated

    terms = _terms([3] * 20, m=7, n=6)  # stacked rank 60, chunks of rank <= 6
    np.testing.assert_allclose(svd_accumulated(terms).dense(), _dense_sum(terms), atol=1e-9)
