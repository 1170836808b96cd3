"""Test environment: offline, no telemetry, Flower's state and fedpeft's cache in temp
dirs; and the ``flwr`` CLI helper that the ``flwr run`` tests share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedpeft-flwr-"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the nodes' partition cache (fedpeft/cache.py): per test session, never the user's
os.environ.setdefault("FEDPEFT_CACHE", tempfile.mkdtemp(prefix="fedpeft-cache-"))

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Under pytest-xdist (`make test`: `pytest -n 2 --dist loadgroup --no-loadscope-reorder`)
# the deployment tests (marker ``full_priority``, one xdist group) go first, on one
# worker, one after the other; the longest of the rest follow on the other. A
# deployment's nodes start a ClientApp process per message (about 9 s of CPU for its
# imports) and must answer within the round's timeout, so every other test runs at a
# lower CPU priority (DEFERENTIAL_NICENESS): it takes the cores the deployment leaves
# idle while it waits on heartbeats and timeouts.
LONGEST_FIRST = (
    "test_deploy_tls.py",
    "test_deploy_resume.py",
    "test_ray_cluster.py",
    "test_flwr_run.py",
    "test_wire_fuzz.py",
    "test_packaged.py",
    "test_cli.py",
)
DEFERENTIAL_NICENESS = 10


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


def _workers() -> int:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pytest_configure(config: pytest.Config) -> None:
    # each worker's torch gets its share of the cores, not all of them: two workers each
    # spinning every core's threads run slower than one
    if _workers() > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers()))


_deferred = False  # this worker has lowered its priority (it cannot raise it again)


def pytest_runtest_setup(item: pytest.Item) -> None:
    global _deferred
    full_priority = item.get_closest_marker("full_priority") is not None
    if _workers() > 1 and not full_priority and not _deferred:
        os.nice(DEFERENTIAL_NICENESS)  # inherited by the test's Ray actors and processes
        _deferred = True


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


@pytest.fixture
def flwr_cli(tmp_path: Path) -> Callable[..., FlwrCli]:
    """``flwr_cli(connection, address, insecure=False, root_certificates=None)``: a
    :class:`FlwrCli` whose ``FLWR_HOME`` is ``tmp_path / "flwr-home"``."""

    def make(
        connection: str, address: str, insecure: bool = False, root_certificates: Path | None = None
    ) -> FlwrCli:
        return FlwrCli(tmp_path / "flwr-home", connection, address, insecure, root_certificates)

    return make
