"""Run outputs: ``metrics.jsonl`` (one line per round), ``samples.jsonl`` (a causal LM's
answers to a few held-out prompts, per round), ``summary.json``, ``adapter/`` (Hugging
Face PEFT format) and ``plots/*.png``.

Every file is written so that a crash never leaves a half-written one: JSON lines are
flushed and fsynced per round; whole files and the adapter directory are written to a
temporary name and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from peft import PeftModel

from fedpeft.config import Config


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: a diverged loss is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_adapter(model: PeftModel, directory: Path) -> None:
    """``save_pretrained`` into a temporary directory, then swap it in."""
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    model.save_pretrained(str(tmp))
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left over by a crash between the two renames
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def _record(line: str) -> dict[str, Any] | None:
    """One metrics line; ``None`` for a blank one or one a killed process cut short."""
    try:
        record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "round" in record else None


class RunLog:
    """Appends round records and writes the summary and plots of one run."""

    def __init__(self, out_dir: Path, cfg: Config, resumed_round: int = 0) -> None:
        """``resumed_round``: keep the lines of rounds up to it (a resumed run), and drop
        any later ones a crash may have left after its last checkpoint."""
        self.out_dir = out_dir
        self.cfg = cfg
        self.started = time.time()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "plots").mkdir(exist_ok=True)
        self.metrics_path = out_dir / "metrics.jsonl"
        # an earlier run's summary describes none of the rounds written from here on; left
        # in place, it would pass a crashed run's outputs off as that finished run's
        (out_dir / "summary.json").unlink(missing_ok=True)
        self.rounds: list[dict[str, Any]] = []
        if resumed_round and self.metrics_path.is_file():
            lines = self.metrics_path.read_text().splitlines()
            records = [r for line in lines if (r := _record(line)) is not None]
            self.rounds = [r for r in records if r["round"] <= resumed_round]
        atomic_write_text(
            self.metrics_path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.rounds)
        )
        self.samples_path = out_dir / "samples.jsonl"
        kept = []
        if resumed_round and self.samples_path.is_file():
            lines = self.samples_path.read_text().splitlines()
            kept = [r for line in lines if (r := _record(line)) and r["round"] <= resumed_round]
        self.samples_path.unlink(missing_ok=True)
        if kept:
            atomic_write_text(self.samples_path, "".join(json.dumps(r) + "\n" for r in kept))

    def log_samples(self, server_round: int, samples: list[dict[str, str]]) -> None:
        """Append a round's (prompt, reference, generation) triples, one per line."""
        if not samples:
            return
        with self.samples_path.open("a") as fh:
            fh.writelines(json.dumps({"round": server_round, **s}) + "\n" for s in samples)
            fh.flush()
            os.fsync(fh.fileno())

    def log_round(self, record: dict[str, Any]) -> None:
        record = {k: _finite_or_none(v) for k, v in record.items()}
        self.rounds.append(record)
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        last = self.rounds[-1] if self.rounds else {}
        summary = {
            "rounds": len(self.rounds),
            "final": {
                k: last.get(k)
                for k in ("accuracy", "exact_match", "loss", "perplexity")
                if k in last
            },
            "uplink_bytes_total": sum(r["uplink_bytes"] for r in self.rounds),
            "downlink_bytes_total": sum(r["downlink_bytes"] for r in self.rounds),
            "rejected_total": sum(len(r["rejected"]) for r in self.rounds),
            **self._compression_summary(),
            "wall_seconds": round(time.time() - self.started, 2),
            **extra,
            "config": self.cfg.to_dict(),
        }
        atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _compression_summary(self) -> dict[str, Any]:
        """Uplink totals against fp32 adapters and against the information bound (runs
        with compression only)."""
        if not self.rounds or "uplink_fp32_bytes" not in self.rounds[0]:
            return {}
        total = {
            k: sum(r[k] for r in self.rounds)
            for k in (
                "uplink_bytes",
                "uplink_fp32_bytes",
                "uplink_payload_bytes",
                "uplink_bound_bytes",
                "uplink_kept_values",
                "downlink_bytes",
                "downlink_fp32_bytes",
            )
        }
        return {
            "compression": {
                "uplink_fp32_bytes_total": total["uplink_fp32_bytes"],
                "uplink_ratio_vs_fp32": _ratio(total["uplink_fp32_bytes"], total["uplink_bytes"]),
                "payload_bytes_total": total["uplink_payload_bytes"],
                "bound_bytes_total": total["uplink_bound_bytes"],
                "payload_over_bound": _ratio(
                    total["uplink_payload_bytes"], total["uplink_bound_bytes"]
                ),
                "kept_values_total": total["uplink_kept_values"],
                "bits_per_kept_value": _ratio(
                    8 * total["uplink_payload_bytes"], total["uplink_kept_values"]
                ),
                "downlink_fp32_bytes_total": total["downlink_fp32_bytes"],
                "downlink_ratio_vs_fp32": _ratio(
                    total["downlink_fp32_bytes"], total["downlink_bytes"]
                ),
            }
        }

    def write_plots(self) -> list[Path]:
        if not self.rounds:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rounds]
        paths = []
        for metric in ("accuracy", "exact_match", "perplexity"):
            scored = [r for r in self.rounds if r.get(metric) is not None]
            if scored:
                xs = [r["round"] for r in scored]
                paths.append(self._plot(plt, xs, {metric: [r[metric] for r in scored]}, metric))
        mb = {
            "uplink": [r["uplink_bytes"] / 1e6 for r in self.rounds],
            "downlink": [r["downlink_bytes"] / 1e6 for r in self.rounds],
        }
        paths.append(self._plot(plt, rounds, mb, "MB per round", name="bytes"))
        spent = [r for r in self.rounds if r.get("epsilon") is not None]
        if spent:
            eps = {"ε spent": [r["epsilon"] for r in spent]}
            xs = [r["round"] for r in spent]
            paths.append(self._plot(plt, xs, eps, f"ε (δ = {spent[0]['delta']:g})", name="epsilon"))
        return paths

    def _plot(
        self,
        plt: Any,
        x: list[int],
        series: dict[str, list[float]],
        ylabel: str,
        name: str | None = None,
    ) -> Path:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for label, ys in series.items():
            ax.plot(x, ys, marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        path = self.out_dir / "plots" / f"{name or ylabel}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
