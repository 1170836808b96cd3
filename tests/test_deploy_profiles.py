"""A real deployment on loopback: one SuperLink, two SuperNodes that declare different
device profiles in their ``--node-config``, and ``flwr run`` against that SuperLink.

Each node must train with the plan of the profile it declared (a phone-like budget: the
top layer at rank 2; a large one: both layers at the fleet's highest rank), although the
run config has no fleet. Every process the test starts is stopped by PID, and so must be
the processes Flower started for them (found by the test's private ports).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "model.name=tiny-bert model.max_length=32 lora.r=4 data.synthetic_samples=200 "
    "partition.num_clients=2 partition.scheme=iid federation.rounds=1 train.local_steps=2 "
    "federation.timeout=120"
)
NODE_CONFIGS = [
    "partition-id=0 device='phone' memory-mb=5 speed=0.5 uplink-mbps=5 max-rank=2",
    "partition-id=1 device='workstation' memory-mb=64",
]


def _free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], wait_s: float = 30) -> None:
    deadline = time.time() + wait_s
    while time.time() < deadline:
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on port {port} after {wait_s:.0f} s")


def _pids_using(ports: list[int]) -> list[int]:
    """Processes whose command line names one of the test's ports: Flower's SuperExec,
    ServerApp and ClientApp processes started for this test (read only)."""
    pids = set()
    for port in ports:
        out = subprocess.run(
            ["pgrep", "-f", f"127\\.0\\.0\\.1:{port}( |$)"], capture_output=True, text=True
        ).stdout
        pids.update(int(p) for p in out.split())
    return sorted(pids - {os.getpid()})


@contextmanager
def _processes(log_dir: Path, env: dict[str, str]) -> Iterator[Callable[..., Any]]:
    """``start(name, *cmd)`` starts a process; on exit each is stopped by its PID (the
    last started first) and must be gone."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, *cmd: str) -> subprocess.Popen[bytes]:
        with (log_dir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(cmd, cwd=log_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        assert all(p.poll() is not None for p in started)


def test_nodes_train_with_the_profiles_they_declare(
    tmp_path: Path, flwr_cli: Callable[..., Any]
) -> None:
    link_port, *node_ports = _free_ports(3)
    flwr = flwr_cli("deploy", f"127.0.0.1:{link_port}", insecure=True)
    out_dir = tmp_path / "out"
    run_config = f"config='{ROOT / 'configs' / 'quickstart.yaml'}' out='{out_dir}' set='{TINY}'"
    began = time.perf_counter()
    try:
        with _processes(tmp_path, flwr.env) as start:
            start_insecure_fleet(start, link_port, dict(zip(node_ports, NODE_CONFIGS, strict=True)))
            run_id = flwr.run(run_config)
            status, listing = flwr.final_status(run_id, wait_s=150)
            assert status == "finished:completed", (listing, _tail(tmp_path))
    finally:
        leftovers = kill_leftovers([link_port, *node_ports])
    print(f"deployment round trip: {time.perf_counter() - began:.1f} s")
    assert not leftovers, f"Flower processes outlived their SuperLink/SuperNode: {leftovers}"

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["client_profiles"] == {"0": "phone", "1": "workstation"}
    phone, workstation = summary["client_plans"]["0"], summary["client_plans"]["1"]
    assert (phone["layers"], phone["max_rank"]) == ([1], 2)  # top layer only, its max-rank
    assert (workstation["layers"], workstation["max_rank"]) == ([0, 1], 16)  # all, fleet.max_rank
    assert summary["left_out"] == {}
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    # both updates were accepted: each matched the shapes of its own plan exactly
    assert sorted(rows[0]["clients"]) == [0, 1] and rows[0]["rejected"] == []
    ranks = {
        k: v.shape[0]
        for k, v in load_file(str(out_dir / "adapter" / "adapter_model.safetensors")).items()
        if "lora_A" in k
    }
    assert {r for k, r in ranks.items() if ".layer.1." in k} == {16}  # the union of both
    assert {r for k, r in ranks.items() if ".layer.0." in k} == {8}


def start_insecure_fleet(start: Callable[..., Any], link_port: int, nodes: dict[int, str]) -> None:
    """A SuperLink without TLS on ``link_port`` and one SuperNode per (port, node config)."""
    link = start(
        "superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1",
        "--port", str(link_port), "--disable-runtime-dependency-installation",
    )  # fmt: skip
    _wait_for_port(link_port, link)
    for i, (port, node_config) in enumerate(nodes.items()):
        start(
            f"supernode{i}", "flower-supernode", "--insecure",
            "--superlink", f"127.0.0.1:{link_port}", "--port", str(port),
            "--node-config", node_config,
        )  # fmt: skip


def kill_leftovers(ports: list[int]) -> list[str]:
    """The test's own descendants (named by its private ports) still alive 20 s after
    their SuperLink and SuperNodes stopped, killed; returns their PIDs and commands."""
    leftovers = _wait_gone(ports, wait_s=20)
    described = [f"{pid} {_command(pid)}" for pid in leftovers]
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    return described


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def _wait_gone(ports: list[int], wait_s: float) -> list[int]:
    deadline = time.time() + wait_s
    while _pids_using(ports) and time.time() < deadline:
        time.sleep(0.5)
    return _pids_using(ports)


def _tail(log_dir: Path, lines: int = 15) -> str:
    """The end of every process log, for a failure message."""
    return "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
        for p in sorted(log_dir.glob("*.log"))
    )
