"""Benchmark: the gradient-inversion audit on MiniLM and sentences of data/mr.

Runs ``fedpeft audit configs/audit/mr.yaml``: label leakage, head-input recovery with
retrieval, the embedding-LoRA token set and the DAGER span test, against each defense
of that config (SGD and no dropout as the attacker's best case; AdamW, dropout, clipping,
local DP, record-level DP, ternary compression, a lower rank, and an embedding LoRA as
an added exposure), for batch sizes 1, 4 and 16, fedSGD and fedAvg. Prints the leakage
table (DIR/audit.md, with the threat model), the mean time per attack, and the wall time.

    python simulations/bench_audit.py [--set key=value ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.audit.report import table  # noqa: E402
from fedpeft.audit.sweep import run_audit  # noqa: E402
from fedpeft.cli import setup_logging  # noqa: E402
from fedpeft.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_audit"))
    args = parser.parse_args()
    os.chdir(ROOT)  # the config's data paths are relative to the project root
    setup_logging(verbose=False)
    cfg = load_config(ROOT / "configs" / "audit" / "mr.yaml", args.set)
    start = time.time()
    summary = run_audit(cfg, Path(args.out))
    print(f"\n{summary['threat_model']}\n")
    print(table(summary))
    seconds: dict[str, list[float]] = defaultdict(list)
    for trial in summary["trials"]:
        if "seconds" in trial:
            seconds[trial["attack"]].append(trial["seconds"])
    print("\nmean seconds per attack: " + ", ".join(
        f"{a} {sum(s) / len(s):.2f}" for a, s in seconds.items()
    ))  # fmt: skip
    print(f"wall time {(time.time() - start) / 60:.1f} min; outputs in {args.out}")


if __name__ == "__main__":
    main()
