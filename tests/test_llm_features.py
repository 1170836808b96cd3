"""Every federated feature on a causal LM: a tiny Llama (SmolLM2's tokenizer and chat
template) instruction-tuned in a federation (in process) with compressed updates and a
mixed-rank fleet, record-level DP (Opacus), user-level and local DP."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedpeft.cli import simulate
from fedpeft.config import config_from_dict

pytestmark = pytest.mark.slow

LLAMA: dict[str, Any] = {
    "seed": 5,
    "model": {"name": "tiny-llama", "task": "causal_lm", "max_length": 48},
    "lora": {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "data": {"synthetic_samples": 120, "synthetic_classes": 3, "test_fraction": 0.2},
    "partition": {"num_clients": 3, "scheme": "iid", "client_test_fraction": 0.0},
    "train": {"local_steps": 2, "batch_size": 4, "lr": 1e-2},
    "federation": {"rounds": 2, "min_clients": 2, "eval_batch_size": 16},
    "eval": {"max_new_tokens": 2, "generate_examples": 6, "samples": 1},
    "simulation": {"client_cpus": 1, "runtime": "inprocess"},
}


def _run(tmp_path: Path, **sections: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    raw = {**LLAMA, **sections}
    simulate(config_from_dict(raw), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert not r["rejected"] and math.isfinite(r["loss"]) and 0 <= r["exact_match"] <= 1
    return rows, summary


def test_compressed_updates_from_a_mixed_rank_fleet(tmp_path: Path) -> None:
    for name, rank in (("small", 1), ("large", 4)):
        (tmp_path / f"{name}.yaml").write_text(f"name: {name}\nmemory_mb: 4000\nmax_rank: {rank}\n")
    _, summary = _run(
        tmp_path,
        fleet={
            "profiles": [str(tmp_path / "small.yaml"), str(tmp_path / "large.yaml")],
            "mix": {"small": 1, "large": 2},
            "max_rank": 4,
        },
        federation={**LLAMA["federation"], "aggregator": "flexlora"},
        compression={"density": 0.2, "error_feedback": True},
    )
    plans = summary["client_plans"]  # the phone's rank-1 plan and the laptops' rank 4
    assert len({json.dumps(v, sort_keys=True) for v in plans.values()}) == 2, plans
    assert summary["compression"]["uplink_ratio_vs_fp32"] > 3


@pytest.mark.parametrize(
    "privacy",
    [
        {"mode": "record", "noise_multiplier": 1.0, "clip_norm": 1.0},
        {"mode": "user", "noise_multiplier": 1.0, "clip_norm": 0.5, "noise_seed": 1},
        {"mode": "local", "noise_multiplier": 1.0, "clip_norm": 0.5, "noise_seed": 1},
    ],
    ids=lambda p: p["mode"],
)
def test_differential_privacy(tmp_path: Path, privacy: dict[str, Any]) -> None:
    rows, _ = _run(tmp_path, privacy=privacy)
    assert all(r["epsilon"] is not None and r["epsilon"] > 0 for r in rows)
    assert rows[1]["epsilon"] > rows[0]["epsilon"]  # two rounds spend more than one
