"""Test environment: offline, no telemetry, Flower state in a temp dir."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedpeft-flwr-"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
