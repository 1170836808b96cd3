"""Benchmark: what a new ClientApp process pays before it can train, with and without
the node's partition cache (``fedpeft/cache.py``).

Flower's deployment runtime starts a new ``flwr-clientapp`` process for every message, so
every round a node pays for Python's imports, the base model and its data again. Each
repetition here is such a fresh process (MiniLM, data/mr, one partition of
``configs/mr.yaml``), timed in three phases:

- imports: process start to fedpeft's client module imported (torch, transformers, peft);
- model: the base model with its LoRA adapters built (what the ClientApp does each round);
- data: the node's partition read, partitioned and tokenized, or read from the cache.

Cache modes: ``off``; ``cold`` (an empty cache: the first round on a node); ``warm`` (the
file the cold run wrote: every later round). Prints the median of each phase and the
cold/warm ratios.

    python simulations/bench_startup.py [--config configs/mr.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("imports", "model", "data")


def child(config: str, partition_id: int, num_labels: int) -> None:
    """One fresh process: time the phases, print them as JSON."""
    import psutil

    born = psutil.Process().create_time()
    sys.path.insert(0, str(ROOT))
    from fedpeft import client
    from fedpeft.config import load_config
    from fedpeft.models import build_peft_model

    imported = time.time()
    cfg = load_config(config)
    started = time.perf_counter()
    build_peft_model(cfg.model, cfg.lora, num_labels)  # the server sends num_labels
    built = time.perf_counter()
    examples = len(client.client_data(cfg, partition_id).train)
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "imports": imported - born,
                "model": built - started,
                "data": done - built,
                "examples": examples,
            }
        )
    )


def fresh_process(config: str, partition_id: int, num_labels: int, cache: str) -> dict[str, float]:
    env = {**os.environ, "FEDPEFT_CACHE": cache, "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", config, str(partition_id), str(num_labels)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mr.yaml")
    parser.add_argument("--partition", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-labels", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return

    runs: dict[str, list[dict[str, float]]] = {"off": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="fedpeft-bench-cache-") as tmp:
        for rep in range(args.repeats):
            cold_dir = str(Path(tmp) / f"cold-{rep}")  # empty: this repetition fills it
            for mode, cache in (("off", "off"), ("cold", cold_dir), ("warm", cold_dir)):
                runs[mode].append(
                    fresh_process(args.config, args.partition, args.num_labels, cache)
                )
    median = {
        mode: {p: statistics.median(r[p] for r in rows) for p in PHASES}
        for mode, rows in runs.items()
    }
    examples = {r["examples"] for rows in runs.values() for r in rows}
    assert len(examples) == 1, f"the cache changed the partition: {examples}"

    print(f"fresh ClientApp process, {args.config}, partition {args.partition} "
          f"({examples.pop()} training examples), median of {args.repeats}")  # fmt: skip
    print("| cache | imports s | model s | data s | total s |")
    print("|---|---|---|---|---|")
    for mode, m in median.items():
        total = sum(m.values())
        print(f"| {mode} | {m['imports']:.2f} | {m['model']:.2f} | {m['data']:.2f} | {total:.2f} |")
    cold, warm = median["cold"], median["warm"]
    print(f"data ready: {cold['data']:.2f} s cold, {warm['data'] * 1e3:.0f} ms warm; "
          f"whole start: cold/warm = {sum(cold.values()) / sum(warm.values()):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
