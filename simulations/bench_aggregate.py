"""Benchmark: server aggregation time and memory of FlexLoRA's exact product aggregation.

MiniLM-sized adapters (6 layers x query, value; 384 x 384 weights; rank 8) from 100 and
1,000 clients, aggregated per module two ways in one run:

- QR route (fedpeft): stack the factors, QR both, SVD of the small core;
- dense route: accumulate Σ_k p_k s_k B_k A_k as an m x n matrix, then its SVD.

Prints seconds per round, the ratio dense / QR, seconds per client (linear scaling shows
as a flat column) and the peak memory numpy allocated (tracemalloc).

    python simulations/bench_aggregate.py [--clients 100 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.aggregation.lowrank import (
    LowRankTerm,
    ThinSVD,
    refactor,
    stack_terms,
    svd_of_product,
)

MODULES, DIM, RANK, ALPHA = 12, 384, 8, 16.0


def client_terms(k: int, rng: np.random.Generator) -> list[LowRankTerm]:
    weights = rng.dirichlet(np.ones(k))
    return [
        LowRankTerm(
            float(p),
            ALPHA / RANK,
            rng.normal(size=(DIM, RANK)).astype(np.float32),
            rng.normal(size=(RANK, DIM)).astype(np.float32),
        )
        for p in weights
    ]


def qr_route(terms: list[LowRankTerm]) -> ThinSVD:
    return svd_of_product(*stack_terms(terms))


def dense_route(terms: list[LowRankTerm]) -> ThinSVD:
    delta = np.zeros((DIM, DIM))
    for t in terms:  # one client's m x n product at a time
        delta += t.weight * t.scaling * (t.lora_b.astype(np.float64) @ t.lora_a)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return ThinSVD(u, s, vt)


def timed(
    route: Callable[[list[LowRankTerm]], ThinSVD], modules: list[list[LowRankTerm]], repeats: int
) -> tuple[float, float]:
    best = float("inf")
    tracemalloc.start()
    for _ in range(repeats):
        start = time.perf_counter()
        for terms in modules:
            refactor(route(terms), RANK, ALPHA / RANK)
        best = min(best, time.perf_counter() - start)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{MODULES} modules of {DIM}x{DIM}, rank {RANK} per client; best of {args.repeats}")
    print(
        f"{'clients':>8} {'QR s':>8} {'dense s':>8} {'dense/QR':>9} {'QR ms/client':>13} {'QR peak MiB':>12} {'dense peak MiB':>15}"
    )
    for k in args.clients:
        modules = [client_terms(k, rng) for _ in range(MODULES)]
        qr_s, qr_mib = timed(qr_route, modules, args.repeats)
        dense_s, dense_mib = timed(dense_route, modules, args.repeats)
        print(
            f"{k:>8} {qr_s:>8.3f} {dense_s:>8.3f} {dense_s / qr_s:>9.2f} {1e3 * qr_s / k:>13.3f} {qr_mib:>12.1f} {dense_mib:>15.1f}"
        )


if __name__ == "__main__":
    main()
