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

``--deployment`` measures whole rounds instead, on Flower's deployment runtime on
loopback: a SuperLink, 3 SuperNodes and ``flwr run``, first with a ClientApp process per
message as Flower runs it, then with a warm worker per node (``fedpeft node``, the node
config's ``worker=``). Per round and node it reads what each reply reports
(``metrics.jsonl``'s ``client_seconds``): Flower's process start to the message
(``startup``), the model and data ready (``load``; with a worker, plus the socket round
trip, which the worker's own status lines separate out) and training; and each round's
wall time. Both runs must end with the same metrics, bit for bit.

    python simulations/bench_startup.py --deployment [--task mr|llm] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the deployment tests' helpers (tests/deployment.py)
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


# ---------------------------------------------------------------- deployment
TASKS = {
    # the recipes of the mr and LLM benchmarks on 3 nodes; the LLM scores 50 held-out
    # rows a round instead of 150 (server-side: not what this measures)
    "mr": ("configs/mr.yaml", ""),
    "llm": ("configs/llm-mr.yaml", "data.max_test_samples=50 eval.generate_examples=50"),
}
LOAD = re.compile(r"round (\d+) train: .*load-seconds ([0-9.e+-]+)")


def deployment_run(task: str, rounds: int, nodes: int, worker: bool, logs: Path) -> dict[str, Any]:
    """One ``flwr run`` on a loopback SuperLink and ``nodes`` SuperNodes (each with a warm
    worker if ``worker``); returns its metrics rows and the workers' own load times."""
    from tests.deployment import (
        FlwrCli,
        free_ports,
        kill_leftovers,
        processes,
        start_insecure_fleet,
    )

    config, extra = TASKS[task]
    data = f"data.source={ROOT}/data/mr/train.jsonl data.test_source={ROOT}/data/mr/test.jsonl"
    overrides = (
        f"{data} partition.num_clients={nodes} federation.min_clients={nodes} "
        f"federation.rounds={rounds} federation.timeout=900 {extra}"
    )
    link_port, *node_ports = free_ports(1 + nodes)
    flwr = FlwrCli(logs / "flwr-home", "bench", f"127.0.0.1:{link_port}", insecure=True)
    # one torch thread per process: 3 nodes share 2 cores, and torch spinning 2 threads
    # in each would measure contention, not start-up (the same in both modes)
    flwr.env.update({"OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"})
    sockets = logs / "sockets"
    out = logs / "out"
    try:
        with processes(logs, flwr.env) as start:
            node_configs = {}
            for i, port in enumerate(node_ports):
                node_configs[port] = f"partition-id={i}"
                if worker:
                    path = sockets / f"node{i}.sock"
                    start(
                        f"worker{i}", sys.executable, "-m", "fedpeft.cli", "node",
                        "--socket", str(path), "--node-config", f"partition-id={i}",
                    )  # fmt: skip
                    _wait_for(lambda p=path: p.exists(), 300, f"worker {i}")  # type: ignore[misc]
                    node_configs[port] += f" worker='{path}'"
            start_insecure_fleet(start, link_port, node_configs)
            began = time.time()
            run_id = flwr.run(f"config='{ROOT / config}' out='{out}' set='{overrides}'")
            status, _ = flwr.final_status(run_id, 3600, written=out / "summary.json")
            wall = time.time() - began
            if status != "finished:completed":
                raise RuntimeError(f"the run ended {status}:\n{flwr.log_tail(run_id)}")
    finally:
        kill_leftovers([link_port, *node_ports])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    worker_load: dict[tuple[int, int], float] = {}
    for i in range(nodes) if worker else ():
        for match in LOAD.finditer((logs / f"worker{i}.log").read_text()):
            worker_load[(int(match[1]), i)] = float(match[2])
    return {"rows": rows, "worker_load": worker_load, "wall": wall}


def _wait_for(ready: Any, wait_s: float, what: str) -> None:
    deadline = time.time() + wait_s
    while not ready():
        if time.time() > deadline:
            raise RuntimeError(f"{what} not ready within {wait_s:.0f} s")
        time.sleep(0.2)


def per_node(run: dict[str, Any]) -> list[dict[str, float]]:
    """One entry per (round, node): its phases, outside training, and the round's time."""
    entries = []
    for row in run["rows"]:
        for node, t in row["client_seconds"].items():
            worker_load = run["worker_load"].get((row["round"], int(node)))
            socket = None if worker_load is None else max(0.0, t["load"] - worker_load)
            entries.append(
                {
                    "round": row["round"],
                    "node": int(node),
                    "startup": t["startup"],
                    "load": t["load"] if socket is None else worker_load,
                    "socket": socket,
                    "outside": t["startup"] + t["load"],
                    "train": t["train"],
                    "round_seconds": row["seconds"],
                }
            )
    return entries


def deployment(task: str, rounds: int, nodes: int) -> None:
    from fedpeft.cli import quiet_flower_env

    quiet_flower_env()  # offline: no telemetry, update checks or runtime installs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = {}
    for mode in ("process", "worker"):
        with tempfile.TemporaryDirectory(prefix=f"fedpeft-bench-{mode}-") as tmp:
            print(f"{task}: {mode} run, {nodes} nodes, {rounds} rounds ...", flush=True)
            runs[mode] = deployment_run(task, rounds, nodes, mode == "worker", Path(tmp))
    print(f"\n{task}, {nodes} SuperNodes on loopback, {rounds} rounds; per round and node:")
    print(
        "| mode | round | node | process start s | model+data s | socket s | outside training s | training s | round s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, run in runs.items():
        for e in per_node(run):
            socket = "" if e["socket"] is None else f"{e['socket']:.3f}"
            print(f"| {mode} | {e['round']} | {e['node']} | {e['startup']:.2f} | {e['load']:.2f} "
                  f"| {socket} | {e['outside']:.2f} | {e['train']:.2f} | {e['round_seconds']:.1f} |")  # fmt: skip
    print("\nafter round 1 (the worker's first round loads the model and the partition):")
    print(
        "| mode | outside training s, median | max | process start s, median | socket s, max | round s, median |"
    )
    print("|---|---|---|---|---|---|")
    for mode, run in runs.items():
        later = [e for e in per_node(run) if e["round"] > 1]
        outside = [e["outside"] for e in later]
        sockets = [e["socket"] for e in later if e["socket"] is not None]
        socket_max = f"{max(sockets):.3f}" if sockets else ""
        print(f"| {mode} | {statistics.median(outside):.2f} | {max(outside):.2f} "
              f"| {statistics.median(e['startup'] for e in later):.2f} | {socket_max} "
              f"| {statistics.median(e['round_seconds'] for e in later):.1f} |")  # fmt: skip
    same = [_untimed(r) for r in runs["process"]["rows"]] == [
        _untimed(r) for r in runs["worker"]["rows"]
    ]
    final = runs["worker"]["rows"][-1]
    metric = "accuracy" if "accuracy" in final else "exact_match"
    print(f"\nfinal {metric}: process {runs['process']['rows'][-1].get(metric)}, "
          f"worker {final.get(metric)}; every round's metrics identical: {same}")  # fmt: skip
    print(
        f"whole runs: process {runs['process']['wall']:.0f} s, worker {runs['worker']['wall']:.0f} s"
    )


def _untimed(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if "seconds" not in k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mr.yaml")
    parser.add_argument("--partition", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-labels", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--deployment", action="store_true", help="whole rounds, with and without workers"
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="mr")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    if args.deployment:
        if not 1 <= args.rounds <= 50 or not 1 <= args.nodes <= 10:
            parser.error("--rounds must be in 1..50 and --nodes in 1..10")
        deployment(args.task, args.rounds, args.nodes)
        return
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
