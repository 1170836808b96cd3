"""DP runs end to end in a federation (in process) with a tiny model: each mode is one
config block away, and ε is reported per round as Opacus's accountant computes it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedpeft.cli import simulate
from fedpeft.config import config_from_dict
from fedpeft.privacy import accounting
from fedpeft.privacy.accounting import Entry
from tests.test_simulation import TINY

pytestmark = pytest.mark.slow

BASE = {
    **TINY,
    "partition": {"num_clients": 4, "scheme": "iid"},
    "federation": {"rounds": 3, "min_clients": 2, "fraction_train": 0.5},
}


def _run(
    tmp_path: Path, privacy: dict[str, Any], **extra: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    simulate(config_from_dict({**BASE, "privacy": privacy, **extra}), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((tmp_path / "run" / "summary.json").read_text())


def test_user_level_dp_reports_the_accountants_epsilon_each_round(tmp_path: Path) -> None:
    rows, summary = _run(
        tmp_path,
        {"mode": "user", "epsilon": 20.0, "clip_norm": 0.5, "noise_seed": 1, "canaries": 16},
    )
    z = summary["privacy"]["noise_multiplier"]
    assert z == accounting.noise_for_budget(20.0, 1e-5, 0.5, 3, "rdp")
    for r in rows:  # 2 of 4 clients a round: q = 0.5, one accountant step per round
        assert r["epsilon"] == pytest.approx(accounting.epsilon([Entry(z, 0.5, r["round"])], 1e-5))
        assert r["delta"] == 1e-5 and len(r["clients"]) == 2
    assert rows[-1]["epsilon"] <= 20.0 and summary["privacy"]["epsilon"] == rows[-1]["epsilon"]
    assert (tmp_path / "run" / "plots" / "epsilon.png").is_file()
    assert all(math.isfinite(r["loss"]) for r in rows)
    # the canary audit's empirical ε sits below the accountant's bound
    canary = summary["privacy"]["canary_audit"]
    assert canary["canaries"] == 16 and 0.0 <= canary["empirical_epsilon"] <= rows[-1]["epsilon"]


def test_a_budget_stops_the_run_after_the_last_affordable_round(tmp_path: Path) -> None:
    z = 2.0  # ε after 1, 2, 3 rounds at q = 0.5: about 1.5, 2.1, 2.5
    n = accounting.affordable_steps(z, 0.5, 2.2, 1e-5, 100, "rdp")
    assert n == 2  # the budget below affords fewer than the configured rounds
    rows, summary = _run(tmp_path, {"mode": "user", "epsilon": 2.2, "noise_multiplier": z})
    assert len(rows) == n == summary["privacy"]["rounds_run"]
    assert rows[-1]["epsilon"] <= 2.2


def test_record_level_dp_composes_each_clients_epsilon_over_its_rounds(tmp_path: Path) -> None:
    rows, summary = _run(
        tmp_path,
        {"mode": "record", "noise_multiplier": 1.0, "clip_norm": 1.0},
        train={"local_steps": 3, "batch_size": 8, "lr": 5e-3},
    )
    eps = [r["epsilon"] for r in rows]
    assert eps == sorted(eps) and eps[0] > 0  # cumulative, never per round
    assert summary["privacy"]["mode"] == "record"
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_local_dp_noise_is_added_on_the_client(tmp_path: Path) -> None:
    rows, _ = _run(tmp_path, {"mode": "local", "epsilon": 50.0, "clip_norm": 0.5})
    # each client's ε composes over the rounds it took part in: 1 or 2 of 3 here
    sigma = 2 * accounting.noise_for_budget(50.0, 1e-5, 1.0, 3, "rdp")
    per_round = [accounting.epsilon([Entry(sigma / 2, 1.0, k)], 1e-5) for k in (1, 2, 3)]
    assert all(any(r["epsilon"] == pytest.approx(e) for e in per_round) for r in rows)
    assert rows[-1]["epsilon"] <= 50.0 * (1 + 1e-3)


def test_user_level_dp_with_compressed_updates(tmp_path: Path) -> None:
    """clip → compress → re-clip on the client, re-check after decoding on the server."""
    rows, summary = _run(
        tmp_path,
        {"mode": "user", "epsilon": 20.0, "clip_norm": 0.05, "noise_seed": 2},
        compression={"density": 0.3, "error_feedback": True},
    )
    assert all(len(r["clients"]) == 2 and r["rejected"] == [] for r in rows)
    assert summary["compression"]["uplink_ratio_vs_fp32"] > 2
    assert all(r["train_loss"] is None for r in rows)  # no unprotected loss leaves a client
