"""Benchmark: seconds per round with one busy neighbour process / idle (fedpeft/threads.py).

Each case is a short simulation in a fresh process (its own Ray instance), once on an idle
machine and once next to one ordinary busy process (``while True: pass``, at this
process's niceness; ``--pin CORE`` pins it to one core), for these variants:

- ``before``: the behaviour before the fix, emulated: ``RAY_worker_niceness=15`` (Ray's
  default: actors 15 above the driver) and no torch thread setting of fedpeft's own;
- ``after``: fedpeft as it is: actors at the driver's niceness, torch threads = the CPUs
  Ray reserved for the actor (``simulation.client_cpus``);
- ``after-1t``: as ``after`` but torch forced to 1 thread (is fewer threads better next to
  a neighbour?).

Round 1 (actors start, models load) is left out of the timing. Each case also reports
the niceness and torch threads its actors really had (read inside the ClientApp), and the
CPU that processes outside the benchmark used meanwhile: on a shared machine that load is
an uninvited neighbour, and a case with much of it is marked.

    python simulations/bench_neighbour.py [--config configs/mr.yaml] [--set key=value ...]
        [--variants before,after,after-1t] [--pin CORE] [--timeout S] [--out DIR]

Run it at normal priority: the neighbour gets this process's niceness, and the actors
get it as well after the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("before", "after", "after-1t")
# short enough that a "before" case next to a neighbour (about 15x slower) stays bounded
DEFAULT_SETS = ["federation.rounds=3", "train.local_steps=4", "partition.num_clients=4"]


def _probe_mod(log: Path, force_threads: int | None) -> Any:
    """Client mod: (optionally force torch's threads, then) record the actor's niceness
    and torch threads for every message."""

    def probe(msg: Any, context: Any, call_next: Any) -> Any:
        import torch

        if force_threads is not None:
            torch.set_num_threads(force_threads)
        entry = {"pid": os.getpid(), "nice": os.nice(0), "threads": torch.get_num_threads()}
        reply = call_next(msg, context)
        with log.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return reply

    return probe


def child(variant: str, config: str, sets: list[str], out: Path) -> None:
    """One case: the simulation, in this fresh process."""
    sys.path.insert(0, str(ROOT))
    from clients.app import make_client_app
    from fedpeft.cli import setup_logging, simulate
    from fedpeft.config import load_config

    setup_logging(verbose=False)
    cfg = load_config(config, sets)
    probe = _probe_mod(out / "probe.jsonl", 1 if variant == "after-1t" else None)
    app = make_client_app([probe], torch_threads=variant == "after")
    simulate(cfg, out / "run", client_app=app)


def _ours(proc: Any, roots: set[int]) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error):
        return proc.pid in roots or any(p.pid in roots for p in proc.parents())
    return True  # gone: cannot tell, do not count it


class ForeignLoad:
    """CPU seconds used, while a case runs, by processes that are neither this benchmark's
    (itself, the case's process tree, the neighbour) nor the kernel's idle loop."""

    def __init__(self, roots: set[int]) -> None:
        self.roots = roots
        self.first: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], float] = {}
        self.names: dict[tuple[int, float], str] = {}
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        ours: set[tuple[int, float]] = set()
        while not self._stop.is_set():
            for proc in psutil.process_iter():
                with contextlib.suppress(psutil.Error):
                    key = (proc.pid, proc.create_time())
                    # once ours, always: a Ray actor outliving the case's stop is
                    # reparented to init, and its whole CPU time is the case's
                    if key in ours or _ours(proc, self.roots):
                        ours.add(key)
                        continue
                    t = proc.cpu_times()
                    used = float(t.user + t.system)
                    base = used if key[1] < self.started else 0.0
                    if key not in self.names:  # before it may exit: every key has a name
                        self.names[key] = " ".join(proc.cmdline())[:60] or proc.name()
                    self.first.setdefault(key, base)
                    self.last[key] = used
            self._stop.wait(2.0)

    def stop(self) -> tuple[float, str]:
        """Average number of cores those processes kept busy, and the busiest of them."""
        self._stop.set()
        self._thread.join()
        used = {k: self.last[k] - self.first[k] for k in self.last}
        top = sorted(used, key=used.__getitem__, reverse=True)[:2]
        seconds = max(time.time() - self.started, 1e-9)
        busiest = "; ".join(f"{self.names[k]} ({used[k] / seconds:.2f})" for k in top)
        return sum(used.values()) / seconds, busiest


# the busy neighbour; it dies with this process (PR_SET_PDEATHSIG = 1, SIGKILL = 9)
NEIGHBOUR = "import ctypes; ctypes.CDLL(None).prctl(1, 9)\nwhile True: pass"


def start_neighbour(pin: int | None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    if pin is not None:
        os.sched_setaffinity(proc.pid, {pin})
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """The process and everything it started (a case's Ray instance)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(tree, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
    proc.wait(timeout=15)


def run_case(
    variant: str, busy: bool, args: argparse.Namespace, out: Path
) -> dict[str, Any] | None:
    """Seconds per round (rounds 2..N) of one case and what its actors ran with; None when
    it failed or ran past the timeout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.jsonl").unlink(missing_ok=True)
    env = dict(os.environ)
    env.pop("RAY_worker_niceness", None)
    if variant == "before":
        env["RAY_worker_niceness"] = "15"  # Ray's default, as before the fix
    cmd = [sys.executable, __file__, "--child", variant, "--config", args.config, "--out", str(out)]
    cmd += [a for s in args.sets for a in ("--set", s)]
    neighbour = start_neighbour(args.pin) if busy else None
    try:
        began = time.time()
        case = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=(out / "log.txt").open("w"))
        roots = {os.getpid(), case.pid, *([neighbour.pid] if neighbour else [])}
        foreign = ForeignLoad(roots)
        try:
            code: int | None = case.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop(case)
            other, busiest = foreign.stop()
        wall = time.time() - began
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if code != 0:
        why = "timed out" if code is None else f"exit code {code}"
        print(f"  {variant} {'busy' if busy else 'idle'}: {why} after {wall:.0f} s; see {out}")
        return None
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    probes = [json.loads(x) for x in (out / "probe.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    return {
        "round_s": statistics.mean(r["seconds"] for r in timed),
        "train_s": statistics.mean(r.get("client_train_seconds_max") or 0.0 for r in timed),
        "rounds": [round(r["seconds"], 1) for r in rows],
        "nice": sorted({p["nice"] for p in probes}),
        "threads": sorted({p["threads"] for p in probes}),
        "other_cores": other,
        "other_busiest": busiest,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mr.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=None, metavar="KEY=VALUE")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--pin", type=int, default=None, help="pin the neighbour to this core")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_neighbour"))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.sets = DEFAULT_SETS if args.sets is None else args.sets
    if args.child:
        child(args.child, args.config, args.sets, Path(args.out))
        return
    # a SIGTERM (a timeout around this script) runs the finally blocks that stop the
    # neighbour and the case's Ray instance
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    print(
        f"{args.config} {' '.join(args.sets)}; {len(os.sched_getaffinity(0))} cores, "
        f"this process at nice {os.nice(0)}, neighbour "
        + ("unpinned" if args.pin is None else f"pinned to core {args.pin}")
    )
    results: dict[tuple[str, bool], dict[str, Any] | None] = {}
    for variant in variants:
        for busy in (False, True):
            name = f"{variant}-{'busy' if busy else 'idle'}"
            results[variant, busy] = r = run_case(variant, busy, args, Path(args.out) / name)
            if r is not None:
                flag = ""
                if r["other_cores"] > 0.15:
                    flag = f"  <- other processes were busy too: {r['other_busiest']}"
                print(
                    f"  {name:15s} {r['round_s']:7.1f} s/round (client train {r['train_s']:.1f}"
                    f" s; rounds {r['rounds']}), actors at nice {r['nice']}, torch threads "
                    f"{r['threads']}, other load {r['other_cores']:.2f} cores{flag}",
                    flush=True,
                )
    print("\nvariant    idle s/round  busy s/round  busy/idle")
    for variant in variants:
        quiet, loaded = results[variant, False], results[variant, True]
        if quiet and loaded:
            ratio = loaded["round_s"] / quiet["round_s"]
            print(f"{variant:9s} {quiet['round_s']:12.1f} {loaded['round_s']:13.1f} {ratio:10.2f}")
        else:
            print(f"{variant:9s} (a case failed: see above)")


if __name__ == "__main__":
    main()
