"""Warm node workers on Flower's deployment runtime, on loopback: a SuperLink, two
SuperNodes whose node config names a worker (``worker=...``), one ``fedpeft node`` per
SuperNode, and ``flwr run`` for five rounds.

Node 0's worker is killed (SIGKILL) while it trains round 2: the test waits for the
worker's accepted connection to appear in ``/proc/net/unix``, and a round's training
takes seconds. That round must record node 0's error ("stopped mid-round"), a new worker
is started on the same socket path (the dead one's socket is stale and replaced), and
the run must finish with node 0 back, served by the new worker. The other worker is
stopped with SIGTERM at the end: exit 0, socket removed."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.deployment import (
    ROOT,
    free_ports,
    kill_leftovers,
    processes,
    start_insecure_fleet,
    tail,
    wait_listening,
)

pytestmark = [pytest.mark.slow, pytest.mark.full_priority, pytest.mark.xdist_group("full_priority")]

TINY = (
    "model.name=tiny-bert model.max_length=32 lora.r=4 data.synthetic_samples=200 "
    "partition.num_clients=2 partition.scheme=iid federation.rounds=5 federation.min_clients=1 "
    "federation.timeout=90 train.local_steps=400"  # about 2 s of training per round
)
KILLED_IN = 2  # the round during which node 0's worker dies


def _serving(path: Path) -> bool:
    """A connection accepted on the socket at ``path`` is open: the worker is mid-round."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return any(line.split()[5] == "03" and line.endswith(f" {path}") for line in lines)


def _rows(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def _kill_mid_round(proc: Any, path: Path, metrics: Path, wait_s: float, logs: Path) -> None:
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if len(_rows(metrics)) == KILLED_IN - 1 and _serving(path):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            return
        time.sleep(0.05)
    raise AssertionError(f"worker 0 was never caught in round {KILLED_IN}\n{tail(logs)}")


def test_a_killed_worker_costs_one_round_and_its_node_comes_back(
    tmp_path: Path, flwr_cli: Callable[..., Any]
) -> None:
    link_port, *node_ports = free_ports(3)
    flwr = flwr_cli("deploy", f"127.0.0.1:{link_port}", insecure=True)
    # two nodes share this machine's cores: torch spinning 2 threads each would make a
    # round last 30 times as long (measured)
    flwr.env["OMP_NUM_THREADS"] = "1"
    sockets = tmp_path / "sockets"
    paths = [sockets / f"node{i}.sock" for i in range(2)]
    out = tmp_path / "out"
    config = ROOT / "configs" / "quickstart.yaml"

    def worker(name: str, i: int) -> Any:
        return start(
            name, sys.executable, "-m", "fedpeft.cli", "node", "--socket", str(paths[i]),
            "--node-config", f"partition-id={i}",
        )  # fmt: skip

    try:
        with processes(tmp_path, flwr.env) as start:
            workers = [worker(f"worker{i}", i) for i in range(2)]
            for i, proc in enumerate(workers):
                wait_listening(tmp_path / f"worker{i}.log", proc)
            start_insecure_fleet(
                start,
                link_port,
                {p: f"partition-id={i} worker='{paths[i]}'" for i, p in enumerate(node_ports)},
            )
            run_id = flwr.run(f"config='{config}' out='{out}' set='{TINY}'")
            _kill_mid_round(workers[0], paths[0], out / "metrics.jsonl", 240, tmp_path)
            restarted = worker("worker0-restarted", 0)
            status, _ = flwr.final_status(run_id, 360, written=out / "summary.json")
            assert status == "finished:completed", flwr.log_tail(run_id) + tail(tmp_path)
            workers[1].send_signal(signal.SIGTERM)
            assert workers[1].wait(30) == 0
            assert not paths[1].exists(), "SIGTERM left the socket behind"
    finally:
        leftovers = kill_leftovers([link_port, *node_ports])
    assert not leftovers, leftovers

    rows = _rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert sorted(rows[0]["clients"]) == [0, 1]
    lost = rows[KILLED_IN - 1]
    assert lost["clients"] == [1], lost
    assert [r["client"] for r in lost["rejected"]] == [0]
    assert "stopped mid-round" in lost["rejected"][0]["reason"]
    assert sorted(rows[-1]["clients"]) == [0, 1] and rows[-1]["rejected"] == []
    assert restarted.poll() is not None  # stopped with the others, by SIGTERM
    served = (tmp_path / "worker0-restarted.log").read_text()
    assert " train: " in served, served  # the new worker trained node 0's last rounds
    # the worker that lived through the run served every round of its node
    assert (tmp_path / "worker1.log").read_text().count(" train: ") == 5
    print(f"node 0's lost round: {lost['rejected'][0]['reason']}")
    print("client seconds, last round:", rows[-1]["client_seconds"])
