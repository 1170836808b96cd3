"""What the benchmark drivers share: run a simulation unless its outputs already exist."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedpeft.cli import simulate
from fedpeft.config import Config


def same_config(stored: dict[str, Any], current: dict[str, Any], default: dict[str, Any]) -> bool:
    """Equal, counting a section or key the stored run predates as its default value, and
    two paths to the same file as equal."""
    for key, value in current.items():
        old = stored.get(key, default.get(key))
        if isinstance(value, dict) and isinstance(old, dict):
            if not same_config(old, value, default.get(key, {})):
                return False
        elif _resolved(old) != _resolved(value):
            return False
    return True


def _resolved(value: Any) -> Any:
    """A path that exists, as the file it names (checkouts in other directories read the
    same data through different paths); a list, item by item (fleet.profiles)."""
    if isinstance(value, list):
        return [_resolved(v) for v in value]
    if isinstance(value, str) and os.path.exists(value):
        return os.path.realpath(value)
    return value


def unread_sections(cfg: Config) -> list[str]:
    """Config sections a run never reads: another PEFT method's (``lora_sb``,
    ``sparse``). Their values cannot change the run, so they do not stop a reuse."""
    return [m for m in ("lora_sb", "sparse") if cfg.peft.method != m]


def run_or_reuse(cfg: Config, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary and metrics rows of ``cfg`` run into ``out``: reused when ``out`` holds
    a finished run of the same config (a benchmark killed halfway resumes where it was),
    else simulated."""
    path = out / "summary.json"
    current, default = json.loads(cfg.to_json()), json.loads(Config().to_json())
    for section in unread_sections(cfg):
        current.pop(section, None)
    if path.is_file() and same_config(json.loads(path.read_text())["config"], current, default):
        summary = json.loads(path.read_text())
    else:
        summary = simulate(cfg, out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def last3_accuracy(rows: list[dict[str, Any]]) -> float:
    """Accuracy as the benchmarks report it: the mean of the last 3 rounds (a single round
    swings by about 3 points)."""
    return sum(r["accuracy"] for r in rows[-3:]) / len(rows[-3:])
