"""`flwr run .` runs the same ServerApp and ClientApp on Flower's local simulation runtime.

`flwr run` starts a local SuperLink on demand and may exit 0 when the ServerApp crashed,
so the test reads the run's final status with `flwr ls`, and stops the SuperLink by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "model.name=tiny-bert model.max_length=32 lora.r=4 data.synthetic_samples=200 "
    "partition.num_clients=2 partition.scheme=iid federation.rounds=1 train.local_steps=2"
)


def _superlink_pids(flwr_home: Path) -> list[int]:
    pattern = f"flower-superlink .*{flwr_home}/local-superlink/superlink.log"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_flwr_run_completes(tmp_path: Path, flwr_cli: Callable[..., Any]) -> None:
    flwr = flwr_cli("local", ":local:")
    flwr.env.update(
        {
            # private ports, so a SuperLink of another run is never reused
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39491",
            "FLWR_LOCAL_CONTROL_API_PORT": "39493",
        }
    )
    out_dir = tmp_path / "out"
    run_config = f"config='{ROOT / 'configs' / 'quickstart.yaml'}' out='{out_dir}' set='{TINY}'"
    try:
        federation = "num-supernodes=2 client-resources-num-cpus=1"
        run_id = flwr.run(run_config, "--federation-config", federation)
        status, listing = flwr.final_status(run_id, 240, written=out_dir / "summary.json")
        assert status == "finished:completed", listing
    finally:
        for pid in _superlink_pids(flwr.home):
            os.kill(pid, signal.SIGTERM)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and sorted(rows[0]["clients"]) == [0, 1]
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()
    deadline = time.time() + 20
    while _superlink_pids(flwr.home) and time.time() < deadline:
        time.sleep(0.5)
    assert not _superlink_pids(flwr.home), "the local SuperLink outlived the test"
