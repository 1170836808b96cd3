"""Benchmark: server time and memory of FlexLoRA's exact product aggregation.

Two routes to the SVD of Σ_k p_k s_k B_k A_k, timed in one run on the same factors:

- QR route: stack the factors, QR both, SVD of the small core (never the m x n matrix);
- accumulated route: add up the m x n sum in chunks of stacked rank <= min(m, n) (one
  GEMM each), then its SVD.

``fedpeft`` (``aggregate_svd``) takes the QR route when the stacked rank R = Σ r_k is below
min(m, n) and the accumulated one otherwise. Cases: MiniLM-sized adapters (12 modules of
384 x 384, rank 8) from 100 and 1,000 clients, where R exceeds 384; and one 2048 x 2048
module (a 1B-parameter model's projection) from 10 and 100 clients of rank 8, where R
is far below the matrix size. Prints seconds, the ratio accumulated / QR, milliseconds per
client (linear scaling shows as a flat column) and peak numpy memory (tracemalloc).

    python simulations/bench_aggregate.py
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
    aggregate_svd,
    refactor,
    stack_terms,
    svd_accumulated,
    svd_of_product,
)

RANK, ALPHA = 8, 16.0
Route = Callable[[list[LowRankTerm]], ThinSVD]
ROUTES: dict[str, Route] = {
    "qr": lambda terms: svd_of_product(*stack_terms(terms)),
    "accumulated": svd_accumulated,
    "fedpeft": aggregate_svd,
}


def client_terms(k: int, dim: int, rng: np.random.Generator) -> list[LowRankTerm]:
    weights = rng.dirichlet(np.ones(k))
    return [
        LowRankTerm(
            float(p),
            ALPHA / RANK,
            rng.normal(size=(dim, RANK)).astype(np.float32),
            rng.normal(size=(RANK, dim)).astype(np.float32),
        )
        for p in weights
    ]


def timed(route: Route, modules: list[list[LowRankTerm]], repeats: int) -> tuple[float, float]:
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
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = [(12, 384, 100), (12, 384, 1000), (1, 2048, 10), (1, 2048, 100)]
    print(f"rank {RANK} per client; best of {args.repeats}; seconds for all modules of a round")
    head = f"{'modules x dim':>14}{'clients':>8}{'R':>6}{'qr s':>8}{'accum s':>9}{'accum/qr':>9}{'fedpeft s':>10}{'qr ms/client':>13}{'qr MiB':>8}{'accum MiB':>10}"
    print(head)
    for n_modules, dim, k in cases:
        modules = [client_terms(k, dim, rng) for _ in range(n_modules)]
        (qr_s, qr_mib), (acc_s, acc_mib), (auto_s, _) = (
            timed(ROUTES[name], modules, args.repeats) for name in ("qr", "accumulated", "fedpeft")
        )
        print(
            f"{f'{n_modules} x {dim}':>14}{k:>8}{k * RANK:>6}{qr_s:>8.3f}{acc_s:>9.3f}"
            f"{acc_s / qr_s:>9.2f}{auto_s:>10.3f}{1e3 * qr_s / k:>13.3f}{qr_mib:>8.1f}{acc_mib:>10.1f}"
        )


if __name__ == "__main__":
    main()
