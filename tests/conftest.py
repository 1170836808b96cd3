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

    def final_status(self, run_id: int, wait_s: float) -> tuple[str, dict[str, object]]:
        """The run's status once it has finished (or the last one seen after ``wait_s``)."""
        deadline = time.time() + wait_s
        while True:
            listing = json.loads(
                self(["ls", self.connection, "--run-id", str(run_id), "--format", "json"])
            )
            status = str(listing["runs"][0]["status"])
            if status.startswith("finished") or time.time() > deadline:
                return status, listing
            time.sleep(2)


@pytest.fixture
def flwr_cli(tmp_path: Path) -> Callable[..., FlwrCli]:
    """``flwr_cli(connection, address, insecure=False, root_certificates=None)``: a
    :class:`FlwrCli` whose ``FLWR_HOME`` is ``tmp_path / "flwr-home"``."""

    def make(
        connection: str, address: str, insecure: bool = False, root_certificates: Path | None = None
    ) -> FlwrCli:
        return FlwrCli(tmp_path / "flwr-home", connection, address, insecure, root_certificates)

    return make
