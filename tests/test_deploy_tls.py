"""A TLS-secured, node-authenticated deployment on loopback, as docs/deployment.md runs
it: ``fedpeft credentials``, a SuperLink with TLS and ``--enable-supernode-auth``, three
registered SuperNodes that declare different device profiles, one unregistered
SuperNode that must be refused, and ``flwr run`` for four rounds. One node is killed
(SIGKILL) after round 1 and, once round 2 has ended without it, restarted with the same
key (the SuperLink refuses the key until it has marked the node offline: two missed
heartbeats, about 60 s). Round 2 must record it, the last round must have it back (round
3 starts as round 2 ends, before the restarted node is online), the run must finish on
its own, and no process may outlive the test."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedpeft.deploy import write_credentials
from tests.deployment import (
    ROOT,
    free_ports,
    kill_leftovers,
    processes,
    tail,
    wait_for_port,
)

# one worker runs the deployment tests, one after the other; the other tests yield the
# CPU to them (tests/conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.full_priority, pytest.mark.xdist_group("full_priority")]

TINY = (
    "model.name=tiny-bert model.max_length=32 lora.r=4 data.synthetic_samples=300 "
    "partition.num_clients=3 partition.scheme=iid federation.rounds=4 train.local_steps=2 "
    "federation.min_clients=2 federation.timeout=90"
)
NODE_CONFIGS = [
    "partition-id=0 device='phone' memory-mb=5 max-rank=2",
    "partition-id=1 device='workstation' memory-mb=64",
    "partition-id=2 device='laptop' memory-mb=64 max-rank=4",
]
KILLED = 2  # the partition whose node dies after round 1 and comes back later


def _wait_for_rounds(metrics: Path, rounds: int, wait_s: float, log_dir: Path) -> None:
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rounds:
            return
        time.sleep(0.5)
    raise AssertionError(f"round {rounds} was not logged within {wait_s:.0f} s\n{tail(log_dir)}")


def test_tls_authenticated_run_survives_a_node_killed_and_restarted(
    tmp_path: Path, flwr_cli: Callable[..., Any]
) -> None:
    creds = tmp_path / "creds"
    write_credentials(creds, nodes=4)
    link_port, *node_ports = free_ports(5)
    address = f"127.0.0.1:{link_port}"
    flwr = flwr_cli("tls", address, root_certificates=creds / "ca.crt")
    out_dir = tmp_path / "out"
    run_config = f"config='{ROOT / 'configs' / 'quickstart.yaml'}' out='{out_dir}' set='{TINY}'"
    try:
        with processes(tmp_path, flwr.env) as start:
            link = start(
                "superlink", "flower-superlink", "--host", "127.0.0.1", "--port", str(link_port),
                "--ssl-ca-certfile", str(creds / "ca.crt"),
                "--ssl-certfile", str(creds / "server.crt"),
                "--ssl-keyfile", str(creds / "server.key"),
                "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            )  # fmt: skip
            wait_for_port(link_port, link)

            def supernode(i: int, node_config: str, name: str = "") -> Any:
                return start(
                    name or f"supernode{i}", "flower-supernode", "--superlink", address,
                    "--root-certificates", str(creds / "ca.crt"), "--port", str(node_ports[i]),
                    "--auth-supernode-private-key", str(creds / f"node-{i}"),
                    "--node-config", node_config,
                )  # fmt: skip

            for i in range(3):
                flwr(["supernode", "register", str(creds / f"node-{i}.pub"), "tls"])
            nodes = [supernode(i, config) for i, config in enumerate(NODE_CONFIGS)]
            intruder = supernode(3, "partition-id=0")  # a valid key nobody registered
            run_id = flwr.run(run_config)
            _wait_for_rounds(out_dir / "metrics.jsonl", 1, wait_s=150, log_dir=tmp_path)
            os.kill(nodes[KILLED].pid, signal.SIGKILL)  # a crash, not a shutdown
            # round 2 ends without it: its message expires after the round's timeout, or
            # the SuperLink answers "unavailable" once the node missed two heartbeats
            _wait_for_rounds(out_dir / "metrics.jsonl", 2, wait_s=180, log_dir=tmp_path)
            # the same key is refused (HTTP 412) while the SuperLink still counts the node
            # online, until it has missed two 30-s heartbeats
            rejoin_by = time.time() + 150
            for attempt in itertools.count():
                node = supernode(KILLED, NODE_CONFIGS[KILLED], name=f"restart{attempt}")
                try:
                    node.wait(timeout=12)  # refused: it exits within a few seconds
                except subprocess.TimeoutExpired:
                    break  # activated: it keeps running
                assert time.time() < rejoin_by, f"the node never rejoined\n{tail(tmp_path)}"
                time.sleep(1)
            status, listing = flwr.final_status(run_id, 180, written=out_dir / "summary.json")
            assert status == "finished:completed", (listing, tail(tmp_path))
            # refused long ago (it exits within seconds), but its exit is asserted here
            # so that the run does not wait for it
            with contextlib.suppress(subprocess.TimeoutExpired):
                intruder.wait(timeout=30)
            assert intruder.returncode not in (None, 0), "an unregistered SuperNode joined"
    finally:
        leftovers = kill_leftovers([link_port, *node_ports])
    assert not leftovers, f"Flower processes outlived their SuperLink/SuperNode: {leftovers}"
    assert "Failed to activate SuperNode" in (tmp_path / "supernode3.log").read_text()

    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert sorted(rows[0]["clients"]) == [0, 1, 2] and rows[0]["rejected"] == []
    assert sorted(rows[1]["clients"]) == [0, 1]  # the round completed with the others
    # the dead node is recorded, as silent or as unavailable, under its own client id
    assert [r["client"] for r in rows[1]["rejected"]] == [KILLED]
    # the restarted node is back once the SuperLink has it online again
    assert sorted(rows[-1]["clients"]) == [0, 1, 2] and rows[-1]["rejected"] == []
    # Flower starts a new ClientApp process per message: every round's replies report
    # the process start (imports) besides the model-and-data-ready time
    loads = [r["client_load_seconds_max"] for r in rows]
    starts = [r["client_startup_seconds_max"] for r in rows]
    print(f"slowest client per round: ready {loads} s, process start {starts} s")
    assert all(isinstance(x, float) and x >= 0 for x in loads)
    assert all(isinstance(x, float) and x > 0.5 for x in starts)  # torch alone takes longer
    summary = json.loads((out_dir / "summary.json").read_text())
    plans = summary["client_plans"]
    assert (plans["0"]["max_rank"], plans["1"]["max_rank"], plans["2"]["max_rank"]) == (2, 16, 4)
