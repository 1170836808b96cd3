"""The audit tap in a federation (in process): it attacks each update as the aggregator gets it,
and scores against the examples the client really trained on (rebuilt from the seed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.cli import simulate
from fedpeft.config import config_from_dict
from tests.test_simulation import TINY

pytestmark = pytest.mark.slow


def test_tap_recovers_the_token_set_of_every_client_round(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {
            **TINY,
            "lora": {"r": 4, "target_modules": ["query", "value", "word_embeddings"]},
            "federation": {"rounds": 2, "min_clients": 2},
            "audit": {"attacks": ["labels", "token_set"], "tap_every": 2, "candidates": 10},
        }
    )
    simulate(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "audit" not in rows[0]  # every 2 rounds
    tapped = rows[1]["audit"]
    # AdamW without weight decay leaves untouched embedding columns exactly as they were:
    # the union of the round's batches is read off exactly, for every client
    assert tapped["token_set"]["token_precision"] == 1.0
    assert tapped["token_set"]["token_recall"] == 1.0
    assert 0.0 <= tapped["labels"]["label_accuracy"] <= 1.0
