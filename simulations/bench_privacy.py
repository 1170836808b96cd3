"""Benchmark: accuracy against the privacy budget ε, record-level and user-level DP.

MiniLM on data/mr, δ = 1e-5, ε ∈ {∞, 8, 3, 1} (∞: the same recipe without DP).

- Record-level DP-SGD (Opacus) on 10 clients, Dirichlet(0.5), all clients every round.
  The non-private recipe of configs/mr.yaml stayed at chance under DP-SGD with the
  model's own pooler, the file's pooling before commit 371dcf5 (docs/architecture.md,
  known traps); this one uses larger Poisson batches, fewer steps, the plain loss (the
  logit-adjusted loss reads the client's label counts) and clipping at C.
- User-level DP-FedAvg with ``--user-clients`` clients, all sampled every round (as many
  as one round on this machine can train in reasonable time), each clipping its whole
  update to C.

Prints accuracy (mean of the last 3 rounds), the ε reached, the noise multiplier z, and
the noise-to-signal ratio: for DP-SGD the noise norm on one step's mean gradient,
zC√d / B, over the largest mean-gradient norm C; for DP-FedAvg the noise norm on the
averaged update, zC√d / m, over the largest averaged-update norm C (d: trainable
parameters). Writes DIR/table.md and DIR/accuracy_vs_epsilon.png.

    python simulations/bench_privacy.py [--rounds 6] [--epsilons inf 8 3 1]
        [--user-clients 40] [--user-local-steps 2] [--user-batch-size 16]
        [--only record|user] [--seed 0] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft import lora_sb  # noqa: E402
from fedpeft.cli import setup_logging  # noqa: E402
from fedpeft.config import Config, load_config  # noqa: E402
from simulations.common import last3_accuracy, run_or_reuse  # noqa: E402

DELTA = 1e-5


def recipe(args: argparse.Namespace) -> list[str]:
    return [
        f"federation.rounds={args.rounds}",
        f"seed={args.seed}",
        "train.logit_adjustment=0",
        f"train.batch_size={args.batch_size}",
        f"train.local_steps={args.local_steps}",
        f"train.lr={args.lr}",
        f"privacy.clip_norm={args.clip}",
        f"privacy.delta={DELTA}",
    ]


def run(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """One simulation (reused if DIR/name already holds a finished run of this config)."""
    cfg = load_config(ROOT / "configs" / "mr.yaml", overrides)
    summary, rows = run_or_reuse(cfg, out / name)
    privacy = summary.get("privacy", {})
    return {
        "accuracy": last3_accuracy(rows),
        "epsilon": privacy.get("epsilon", math.inf),
        "z": privacy.get("noise_multiplier"),
        "minutes": summary["wall_seconds"] / 60,
        "cfg": cfg,
    }


def trainable(cfg: Config) -> int:
    """d: the parameters a client sends (LoRA factors and head, or LoRA-SB's Rs and head)."""
    return sum(math.prod(s) for s in lora_sb.run_shapes(cfg, 2).values())


def record_noise_multiplier(cfg: Config, eps: float) -> float:
    """z of the smallest client (the most noise any client adds), as the client computes it."""
    from fedpeft.client import client_data, record_noise

    smallest = min(len(client_data(cfg, p).train) for p in range(cfg.partition.num_clients))
    return record_noise(cfg, smallest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[math.inf, 8, 3, 1])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--user-clients", type=int, default=40)
    parser.add_argument("--user-local-steps", type=int, default=2)
    parser.add_argument("--user-batch-size", type=int, default=16)
    parser.add_argument("--only", choices=["record", "user"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_privacy"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)"
    )
    args = parser.parse_args()
    os.chdir(ROOT)
    setup_logging(verbose=False)
    out = Path(args.out) / f"seed{args.seed}"
    rows: list[dict[str, Any]] = []
    for mode in ("record", "user"):
        if args.only and mode != args.only:
            continue
        extra = [] if mode == "record" else [
            f"partition.num_clients={args.user_clients}",
            f"train.local_steps={args.user_local_steps}",
            f"train.batch_size={args.user_batch_size}",
        ]  # fmt: skip
        for eps in args.epsilons:
            priv = [] if math.isinf(eps) else [f"privacy.mode={mode}", f"privacy.epsilon={eps}"]
            name = f"{mode}-eps{eps:g}"
            r = run(name, [*recipe(args), *extra, *priv, *args.set], out)
            cfg, d = r["cfg"], trainable(r["cfg"])
            if math.isinf(eps):
                nsr = 0.0
            elif mode == "record":
                r["z"] = record_noise_multiplier(cfg, eps)
                nsr = r["z"] * math.sqrt(d) / cfg.train.batch_size
            else:
                nsr = r["z"] * math.sqrt(d) / cfg.partition.num_clients
            rows.append({"mode": mode, "target": eps, **r, "nsr": nsr, "d": d})

    lines = [
        "| DP | clients / round | ε target | ε reached | z | noise / signal | accuracy (last 3) | minutes |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        label = "record-level (DP-SGD)" if r["mode"] == "record" else "user-level (DP-FedAvg)"
        z = "–" if r["z"] is None else f"{r['z']:.3f}"
        lines.append(
            f"| {label} | {r['cfg'].partition.num_clients} | {r['target']:g} | {r['epsilon']:.3g} "
            f"| {z} | {r['nsr']:.2f} | {r['accuracy']:.4f} | {r['minutes']:.1f} |"
        )
    title = (
        f"MiniLM on mr, {args.rounds} rounds, δ = {DELTA:g}, clip C = {args.clip}, lr {args.lr}, "
        f"d = {rows[0]['d']} trainable parameters, seed {args.seed}; record-level: batch "
        f"{args.batch_size} x {args.local_steps} steps per round; user-level: batch "
        f"{args.user_batch_size} x {args.user_local_steps} steps"
        + (f"; overrides: {' '.join(args.set)}" if args.set else "")
    )
    table = "\n".join(lines)
    print(f"\n{title}\n{table}")
    (out / "table.md").write_text(f"{title}\n\n{table}\n")
    plot(rows, out / "accuracy_vs_epsilon.png")
    print(f"\nwrote {out / 'table.md'} and {out / 'accuracy_vs_epsilon.png'}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [r["target"] for r in rows if not math.isinf(r["target"])]
    at_inf = 2 * max(finite, default=8)  # ε = ∞ drawn right of the largest finite ε
    for mode, marker in (("record", "o"), ("user", "s")):
        pts = sorted(
            (at_inf if math.isinf(r["target"]) else r["target"], r["accuracy"])
            for r in rows
            if r["mode"] == mode
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                    label="record-level DP-SGD" if mode == "record" else "user-level DP-FedAvg")  # fmt: skip
    ax.set_xscale("log")
    ticks = [*sorted(set(finite)), at_inf]
    ax.set_xticks(ticks, [*(f"{t:g}" for t in ticks[:-1]), "∞"])
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("accuracy (mean of last 3 rounds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
