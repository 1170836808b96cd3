"""Run outputs: a run started in a directory never leaves an earlier run's files looking
like its own."""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft.config import Config
from fedpeft.report import RunLog


def test_a_new_run_removes_the_summary_of_the_run_before_it(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": 12}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.8}) + "\n")
    run_log = RunLog(tmp_path, Config())
    # killed now, the directory holds no finished run to be mistaken for this one
    assert not (tmp_path / "summary.json").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    run_log.log_round({"round": 1, "accuracy": 0.5})
    assert [json.loads(x)["accuracy"] for x in (tmp_path / "metrics.jsonl").open()] == [0.5]
