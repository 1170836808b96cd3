"""The ServerApp with nodes that declare their device profiles (in process; the
partition rules themselves are unit-tested in tests/test_serverrun.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import UserConfig
from safetensors.numpy import load_file

from clients.app import make_client_app
from fedpeft.config import load_config
from fedpeft.loopback import run_loopback
from server.app import make_server_app

ROOT = Path(__file__).resolve().parents[1]


def test_nodes_train_with_the_profiles_they_declare(tmp_path: Path, caplog: Any) -> None:
    """Nodes that declare device profiles in their node config, as SuperNodes do with
    ``--node-config``, train with the plans the server makes for them, although the run
    config has no fleet; a malformed declaration leaves its node out, with the reason.
    (tests/test_deploy_tls.py declares profiles from real SuperNodes.)"""
    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            "model.name=tiny-bert", "model.max_length=32", "lora.r=4",
            "data.synthetic_samples=200", "partition.num_clients=2", "partition.scheme=iid",
            "federation.rounds=1", "train.local_steps=2",
        ],
    )  # fmt: skip
    declared: list[UserConfig] = [
        {"partition-id": 0, "device": "phone", "memory-mb": 5, "speed": 0.5,
         "uplink-mbps": 5, "max-rank": 2},
        {"partition-id": 1, "device": "workstation", "memory-mb": 64},
        {"partition-id": 1, "memory-mb": -3},  # malformed: left out
    ]  # fmt: skip
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        run_loopback(make_server_app(cfg, out), make_client_app(), 3, 1, declared)
    assert "declares a malformed device profile and takes no part" in caplog.text

    summary = json.loads((out / "summary.json").read_text())
    assert summary["client_profiles"] == {"0": "phone", "1": "workstation"}
    phone, workstation = summary["client_plans"]["0"], summary["client_plans"]["1"]
    assert (phone["layers"], phone["max_rank"]) == ([1], 2)  # top layer only, its max-rank
    assert (workstation["layers"], workstation["max_rank"]) == ([0, 1], 16)  # all, fleet.max_rank
    assert summary["left_out"] == {}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # both updates were accepted: each matched the shapes of its own plan exactly
    assert [r["round"] for r in rows] == [1]
    assert sorted(rows[0]["clients"]) == [0, 1] and rows[0]["rejected"] == []
    ranks = {
        k: v.shape[0]
        for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()
        if "lora_A" in k
    }
    assert {r for k, r in ranks.items() if ".layer.1." in k} == {16}  # the union of both
    assert {r for k, r in ranks.items() if ".layer.0." in k} == {8}
