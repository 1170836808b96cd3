"""Test environment: offline, no telemetry, Flower's state and fedpeft's cache in temp
dirs; and the ``flwr`` CLI helper that the ``flwr run`` tests share."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deployment import FlwrCli

os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedpeft-flwr-"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the nodes' partition cache (fedpeft/cache.py): per test session, never the user's
os.environ.setdefault("FEDPEFT_CACHE", tempfile.mkdtemp(prefix="fedpeft-cache-"))


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
    "test_deploy_worker.py",
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


@pytest.fixture
def flwr_cli(tmp_path: Path) -> Callable[..., FlwrCli]:
    """``flwr_cli(connection, address, insecure=False, root_certificates=None)``: a
    :class:`FlwrCli` whose ``FLWR_HOME`` is ``tmp_path / "flwr-home"``."""

    def make(
        connection: str, address: str, insecure: bool = False, root_certificates: Path | None = None
    ) -> FlwrCli:
        return FlwrCli(tmp_path / "flwr-home", connection, address, insecure, root_certificates)

    return make
