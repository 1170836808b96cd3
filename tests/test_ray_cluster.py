"""A simulation on an existing Ray cluster: the test starts a two-node cluster on loopback
(``ray start --head`` and ``ray start --address``, one CPU each), runs ``fedpeft
simulate`` with ``simulation.ray_address`` pointing at the head, and stops every process
of the cluster by PID afterwards.

With one CPU per node and ``simulation.client_cpus: 1``, Flower's actor pool holds one
actor per node, so the virtual clients must spread over both nodes; ``summary.json``
says where each client round ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.deployment import ROOT, free_ports

BIN = Path(sys.executable).parent
TINY = [
    "model.name=tiny-bert", "model.max_length=32", "lora.r=4", "data.synthetic_samples=200",
    "partition.num_clients=4", "partition.scheme=iid", "federation.rounds=2",
    "train.local_steps=2", "simulation.client_cpus=1",
]  # fmt: skip


def _ray_start(env: dict[str, str], *args: str) -> None:
    # a node's agent and client-server ports default to fixed numbers: give each its own
    agent, client = free_ports(2)
    cmd = [str(BIN / "ray"), "start", "--num-cpus", "1", "--disable-usage-stats", *args]
    cmd += ["--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _cluster_processes(temp_dir: Path, port: int) -> list[psutil.Process]:
    """The cluster's processes: those whose command line names its temp dir or its head's
    port (GCS, raylets, monitors, client server), and their descendants (agents, actors)."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.pid != os.getpid() and (str(temp_dir) in cmd or f":{port}" in cmd):
            roots.append(proc)
    found = {p.pid: p for p in roots}
    for proc in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({c.pid: c for c in proc.children(recursive=True)})
    return list(found.values())


def _stop(processes: list[psutil.Process]) -> list[int]:
    """SIGTERM each, SIGKILL what is left after 15 s; returns the PIDs still alive."""
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=15)
    for proc in alive:
        proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


@pytest.mark.slow
def test_clients_spread_over_a_two_node_ray_cluster(tmp_path: Path) -> None:
    # Ray's socket paths must stay short, so not under pytest's tmp_path
    temp_dir = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))
    [port] = free_ports(1)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out = tmp_path / "out"
    try:
        _ray_start(env, "--head", "--port", str(port), "--include-dashboard=false",
                   "--temp-dir", str(temp_dir))  # fmt: skip
        _ray_start(env, "--address", f"127.0.0.1:{port}")
        began = time.perf_counter()
        sets = [
            a for s in [*TINY, f"simulation.ray_address=127.0.0.1:{port}"] for a in ("--set", s)
        ]
        sim = subprocess.run(
            [str(BIN / "fedpeft"), "simulate", "configs/quickstart.yaml", "--out", str(out), *sets],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(f"simulation on the cluster: {time.perf_counter() - began:.1f} s")
        assert sim.returncode == 0, sim.stderr[-3000:]
    finally:
        cluster = _cluster_processes(temp_dir, port)
        survivors = _stop(cluster)
    assert len(cluster) >= 4, "the cluster's processes were not found: were they stopped?"
    assert not survivors, f"Ray processes survived SIGKILL: {survivors}"
    assert not _cluster_processes(temp_dir, port)

    print("\n".join(line for line in sim.stderr.splitlines() if "Ray node" in line))
    nodes = json.loads((out / "summary.json").read_text())["ray_nodes"]
    assert len(nodes) == 2, nodes  # both the head and the worker ran clients
    assert all(entry["client_rounds"] > 0 for entry in nodes.values())
    assert sum(entry["client_rounds"] for entry in nodes.values()) == 4 * 2
    assert {c for entry in nodes.values() for c in entry["clients"]} == {0, 1, 2, 3}


def test_an_address_no_cluster_answers_at_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedpeft.cli import main

    [port] = free_ports(1)  # nothing listens there
    sets = [a for s in [*TINY, f"simulation.ray_address=127.0.0.1:{port}"] for a in ("--set", s)]
    config = str(ROOT / "configs" / "quickstart.yaml")
    assert main(["simulate", config, "--out", str(tmp_path), *sets]) == 2
    # besides the log's progress lines, one sentence
    err = [ln for ln in capsys.readouterr().err.splitlines() if " fedpeft | " not in ln]
    assert len(err) == 1 and err[0].startswith(
        f"fedpeft: No Ray cluster answers at '127.0.0.1:{port}'"
    )
