"""Benchmark: federated LoRA on sentence polarity (data/mr).

MiniLM with mean pooling, LoRA r=8 on query/value + classifier, 10 clients with
Dirichlet(0.5) label skew, 10 local AdamW steps (ε = 1e-3) of 16 per round, FedIT
aggregation (configs/mr.yaml). Prints accuracy per round, the mean of the last 3 rounds
(the target is >= 0.78), total uplink bytes and wall time.

    python simulations/bench_mr.py [--set key=value ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.cli import setup_logging, simulate  # noqa: E402
from fedpeft.config import load_config  # noqa: E402
from simulations.common import last3_accuracy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_mr"))
    args = parser.parse_args()
    os.chdir(ROOT)  # the config's data paths are relative to the project root
    setup_logging(verbose=False)
    cfg = load_config(ROOT / "configs" / "mr.yaml", args.set)
    start = time.time()
    summary = simulate(cfg, Path(args.out))
    wall = time.time() - start
    rows = [
        json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()
    ]
    print("\nround  accuracy  uplink_MB  seconds")
    for r in rows:
        up_mb = r["uplink_bytes"] / 1e6
        print(f"{r['round']:5d}  {r['accuracy']:.4f}  {up_mb:9.2f}  {r['seconds']:7.1f}")
    last3 = last3_accuracy(rows)
    print(f"\naccuracy, mean of the last 3 rounds: {last3:.4f} (target >= 0.78)")
    print(
        f"uplink total: {summary['uplink_bytes_total'] / 1e6:.1f} MB; downlink total: "
        f"{summary['downlink_bytes_total'] / 1e6:.1f} MB"
    )
    print(f"wall time: {wall / 60:.1f} min for {len(rows)} rounds")


if __name__ == "__main__":
    main()
