"""A hostile client in a federation (in process): an update beyond ``federation.max_update_norm``
is rejected with its norm as the reason, and one that stays under the bound but is 300×
too large, and reversed, does not move the ``median`` aggregate off course (the same run
with ``flexlora``, a weighted mean, ends at loss 3.28 from 1.10)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedpeft.cli import simulate
from fedpeft.config import config_from_dict
from tests.test_golden import hostile_client_app
from tests.test_simulation import TINY

pytestmark = pytest.mark.slow
AGGREGATOR = "median"


def test_a_hostile_client_is_bounded_and_outvoted(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {
            **TINY,
            "partition": {"num_clients": 3, "scheme": "iid"},
            "federation": {
                "rounds": 3,
                "min_clients": 3,
                "aggregator": AGGREGATOR,
                "max_update_norm": 1e4,
            },
        }
    )
    summary = simulate(cfg, tmp_path / "run", client_app=hostile_client_app(0))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (rejected,) = rows[0]["rejected"]
    assert rejected["client"] == 0 and "exceeds max_update_norm 10000" in rejected["reason"]
    assert sorted(rows[0]["clients"]) == [1, 2]
    assert [r["rejected"] for r in rows[1:]] == [[], []]  # under the bound: accepted...
    # ...and outvoted: the loss stays where two honest clients take it
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] <= summary["initial"]["loss"] + 0.05
