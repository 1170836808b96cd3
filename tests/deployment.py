"""Helpers of the deployment tests (and of ``simulations/bench_startup.py --deployment``):
free ports, processes started and stopped by PID, the Flower processes they leave
behind, their logs, and the ``flwr`` CLI with a private ``FLWR_HOME``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def wait_for_port(port: int, proc: subprocess.Popen[bytes], wait_s: float = 30) -> None:
    deadline = time.time() + wait_s
    while time.time() < deadline:
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on port {port} after {wait_s:.0f} s")


def wait_listening(log: Path, proc: subprocess.Popen[bytes], wait_s: float = 120) -> None:
    """Until a ``fedpeft node`` worker, logging to ``log``, says it listens."""
    deadline = time.time() + wait_s
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()
        if "listening at" in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"the worker did not listen within {wait_s:.0f} s: {log.read_text()}")


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
def processes(log_dir: Path, env: dict[str, str]) -> Iterator[Callable[..., Any]]:
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


def start_insecure_fleet(start: Callable[..., Any], link_port: int, nodes: dict[int, str]) -> None:
    """A SuperLink without TLS on ``link_port`` and one SuperNode per (port, node config)."""
    link = start(
        "superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1",
        "--port", str(link_port), "--disable-runtime-dependency-installation",
    )  # fmt: skip
    wait_for_port(link_port, link)
    for i, (port, node_config) in enumerate(nodes.items()):
        start(
            f"supernode{i}", "flower-supernode", "--insecure",
            "--superlink", f"127.0.0.1:{link_port}", "--port", str(port),
            "--node-config", node_config,
        )  # fmt: skip


def kill_leftovers(ports: list[int], lingering: str = "") -> list[str]:
    """The test's own descendants (named by its private ports) still alive 20 s after
    their SuperLink and SuperNodes stopped, killed; returns their PIDs and commands.
    Processes whose command line holds ``lingering`` (known to outlive their SuperNode)
    are not waited for, only killed and returned."""
    leftovers = _wait_gone(ports, wait_s=20, unless=lingering)
    described = [f"{pid} {_command(pid)}" for pid in leftovers]
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    return described


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def _wait_gone(ports: list[int], wait_s: float, unless: str = "") -> list[int]:
    """The processes left of ``ports``, once all but those whose command line holds
    ``unless`` are gone or ``wait_s`` has passed."""
    deadline = time.time() + wait_s
    while time.time() < deadline:
        waited = [p for p in _pids_using(ports) if not unless or unless not in _command(p)]
        if not waited:
            break
        time.sleep(0.5)
    return _pids_using(ports)


def tail(log_dir: Path, lines: int = 15) -> str:
    """The end of every process log, for a failure message."""
    return "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
        for p in sorted(log_dir.glob("*.log"))
    )


class FlwrCli:
    """This environment's ``flwr`` with a private ``FLWR_HOME`` and one SuperLink
    connection in its ``config.toml``. ``flwr run`` may exit 0 although the ServerApp
    crashed, so :meth:`final_status` reads the run's status with ``flwr ls``."""

    def __init__(
        self,
        home: Path,
        connection: str,
        address: str,
        insecure: bool,
        root_certificates: Path | None = None,
    ) -> None:
        home.mkdir(parents=True, exist_ok=True)
        line = f'address = "{address}"' + ("\ninsecure = true" if insecure else "")
        if root_certificates is not None:  # TLS with a private CA
            line += f'\nroot-certificates = "{root_certificates}"'
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n{line}\n'
        )
        self.home = home
        self.connection = connection
        self.env = {
            **os.environ,
            # flwr, flower-superlink and flower-supernode start Flower's other commands
            # by name: they must be this environment's
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(home),
        }

    def __call__(self, args: list[str], timeout: float = 120) -> str:
        proc = subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def run(self, run_config: str, *extra: str) -> int:
        """``flwr run .`` on this connection; returns the run id."""
        args = ["run", ".", self.connection, "--format", "json", "--run-config", run_config]
        started = json.loads(self([*args, *extra]))
        assert started["success"], started
        return int(started["run-id"])

    def log_tail(self, run_id: int, lines: int = 30) -> str:
        """The end of the run's ServerApp log, for a failure message."""
        text = self(["log", str(run_id), self.connection, "--show"])
        return "\n".join(text.splitlines()[-lines:])

    def final_status(
        self, run_id: int, wait_s: float, written: Path | None = None
    ) -> tuple[str, dict[str, object]]:
        """The run's status once it has finished (or the last one seen after ``wait_s``).

        Each ``flwr ls`` is a Python process that costs about 2 s of CPU, which the
        nodes' ClientApp processes need: with ``written`` (a file the run writes as it
        ends, e.g. its summary) the wait watches that file first and asks Flower only
        then, and the asks are 3 s apart."""
        deadline = time.time() + wait_s
        while written is not None and not written.exists() and time.time() < deadline:
            time.sleep(0.5)
        while True:
            listing = json.loads(
                self(["ls", self.connection, "--run-id", str(run_id), "--format", "json"])
            )
            status = str(listing["runs"][0]["status"])
            if status.startswith("finished") or time.time() > deadline:
                return status, listing
            time.sleep(3)
