"""Aggregators by name.

Each aggregator maps the global adapter state and the round's client updates to the new
global state. Build by name from :data:`AGGREGATORS`; add one by registering it here.
"""

from __future__ import annotations

from collections.abc import Callable

from fedpeft.aggregation.base import ClientUpdate, State, server_step
from fedpeft.aggregation.fedit import aggregate_fedit

Aggregator = Callable[[State, list[ClientUpdate]], State]

AGGREGATORS: dict[str, Aggregator] = {
    "fedit": aggregate_fedit,
}


def get_aggregator(name: str) -> Aggregator:
    if name not in AGGREGATORS:
        raise ValueError(f"Unknown aggregator {name!r}; expected one of {sorted(AGGREGATORS)}.")
    return AGGREGATORS[name]


__all__ = ["AGGREGATORS", "Aggregator", "ClientUpdate", "State", "get_aggregator", "server_step"]
