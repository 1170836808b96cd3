"""Aggregators by name.

An aggregator cuts the global adapters to each client's plan and rebuilds them from the
round's updates (:class:`~fedpeft.aggregation.base.Aggregator`). Build by name from
:data:`AGGREGATORS`; add one by registering it here.

- ``flexlora``: exact product aggregation, SVD re-factorized per rank (heterogeneous ranks).
- ``flora``: FLoRA, the stacked exact product merged into every client's base weights
  (exact; the stack grows with the clients); it also implements :class:`MergesIntoBase`.
- ``zero_pad``: HetLoRA, zero-padded factor averaging (baseline, inexact).
- ``rbla``: RBLA, each rank component averaged over the clients that own it (inexact).
- ``fedit``: FedAvg of the factors (baseline, inexact for the product).
- ``median``, ``trimmed_mean``: coordinate-wise median / 20%-trimmed mean of the exact
  product changes, for fleets with untrusted clients (unweighted).
"""

from __future__ import annotations

from fedpeft.aggregation.base import Aggregator, ClientUpdate, MergesIntoBase, State, server_step
from fedpeft.aggregation.fedit import FedIT, aggregate_fedit
from fedpeft.aggregation.flexlora import FlexLoRA
from fedpeft.aggregation.flora import FLoRA, merge_stacks
from fedpeft.aggregation.rbla import RBLA
from fedpeft.aggregation.robust import RobustProduct, coordinate_median, trimmed_mean
from fedpeft.aggregation.zero_pad import ZeroPad

AGGREGATORS: dict[str, Aggregator] = {
    "fedit": FedIT(),
    "zero_pad": ZeroPad(),
    "rbla": RBLA(),
    "flexlora": FlexLoRA(),
    "flora": FLoRA(),
    "median": RobustProduct(coordinate_median),
    "trimmed_mean": RobustProduct(trimmed_mean(0.2)),
}


def get_aggregator(name: str) -> Aggregator:
    if name not in AGGREGATORS:
        raise ValueError(f"Unknown aggregator {name!r}; expected one of {sorted(AGGREGATORS)}.")
    return AGGREGATORS[name]


__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "ClientUpdate",
    "MergesIntoBase",
    "State",
    "aggregate_fedit",
    "get_aggregator",
    "merge_stacks",
    "server_step",
]
