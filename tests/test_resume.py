"""``fedpeft simulate --resume``: a run stopped after round k and resumed ends exactly
where an uninterrupted run with the same seed ends; checkpoints survive a crash mid-write;
runs whose state lives on the nodes are refused in one sentence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpeft.checkpoint import FILE, Checkpoint, load_checkpoint, save_checkpoint
from fedpeft.cli import main, simulate
from fedpeft.config import ConfigError, config_from_dict
from tests.test_simulation import TINY

# 2 of 3 clients a round: the sample depends on the round number, which a resumed
# process must continue rather than restart
BASE = {**TINY, "federation": {**TINY["federation"], "rounds": 3, "fraction_train": 0.67}}


def _rows(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # timings vary


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])  # adam: buffers m and v to carry
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(
    tmp_path: Path, optimizer: str
) -> None:
    base = {**BASE, "federation": {**BASE["federation"], "server_optimizer": optimizer}}
    if optimizer == "adam":
        base["federation"]["server_lr"] = 0.01
    simulate(config_from_dict(base), tmp_path / "whole")
    # "killed" after round 2: the same config with 2 rounds, then resumed to 3
    two = {**base, "federation": {**base["federation"], "rounds": 2}}
    simulate(config_from_dict(two), tmp_path / "split")
    with (tmp_path / "split" / "metrics.jsonl").open("a") as fh:  # a half-logged round 3
        fh.write(json.dumps({"round": 3, "accuracy": 0.0}) + "\n")
    if optimizer == "adam":
        assert {k[:2] for k in load_checkpoint(tmp_path / "split").buffers} == {"m/", "v/"}
    summary = simulate(config_from_dict(base), tmp_path / "split", resume=True)
    assert _rows(tmp_path / "split") == _rows(tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["final"] == whole["final"] and summary["rounds"] == 3
    assert summary["initial"] == whole["initial"]
    assert load_checkpoint(tmp_path / "split").round == 3


def test_more_rounds_cannot_stretch_a_budget_the_noise_was_computed_for() -> None:
    from fedpeft.checkpoint import resume_problem

    federation = {**BASE["federation"], "client_eval": False}
    private = {**BASE, "federation": federation, "privacy": {"mode": "user", "epsilon": 20.0}}
    ckpt = Checkpoint(2, config_from_dict(private).to_dict(), {}, {}, {})
    longer = {**private, "federation": {**private["federation"], "rounds": 6}}
    problem = resume_problem(config_from_dict(longer), ckpt)
    assert problem is not None and "computed to spend ε over 3 rounds" in problem
    assert resume_problem(config_from_dict(private), ckpt) is None


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_checkpoint(tmp_path, Checkpoint(4, {"seed": 0}, state, {"history": {}}, {"loss": 1.0}))
    # a writer killed mid-file leaves only its temporary file behind
    (tmp_path / f".{FILE}.crashed.npz").write_bytes(b"PK\x03\x04 half a zip")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 4 and ckpt.initial == {"loss": 1.0}
    np.testing.assert_array_equal(ckpt.global_state["w"], state["w"])
    (tmp_path / FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, "No checkpoint in"),
        ({"compression": {"density": 0.1}}, "error-feedback residuals live on the nodes"),
        (
            {"compression": {"density": 0.1, "error_feedback": False, "downlink": True}},
            "downlink views live on the nodes",
        ),
        ({"lora": {"r": 2}}, "the config differs from the checkpoint's in: lora"),
    ],
)
def test_resume_mistakes_end_in_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], message: str
) -> None:
    import yaml

    out = tmp_path / "run"
    out.mkdir()
    if change:  # a checkpoint of the unchanged config
        cfg = config_from_dict(BASE)
        save_checkpoint(out, Checkpoint(1, cfg.to_dict(), {}, {}, {}))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change}))
    assert main(["simulate", str(path), "--out", str(out), "--resume"]) == 2
    assert message in capsys.readouterr().err
