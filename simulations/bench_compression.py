"""Benchmark: ComPEFT-compressed uplink against fp32 updates, with and without error feedback.

MiniLM on data/mr with the recipe of configs/mr.yaml (LoRA r=8 on query/value
+ head, 10 clients, Dirichlet(0.5), 10 local steps of 16), the same rounds and seed for
every run. Prints one row per run: accuracy (mean of the last 3 rounds), total uplink
bytes (as carried in the Flower messages), the ratio against the fp32 run, bits per kept
value and the gap of the payload to its information bound (both from the run's
metrics.jsonl), and the codec's encode/decode time per update, timed on updates of the
run's adapter shapes. Writes the table to DIR/table-SCALE.md and accuracy against uplink
bytes to DIR/accuracy_vs_uplink-SCALE.png.

    python simulations/bench_compression.py [--rounds 15] [--densities 0.2 0.1 0.05 0.01]
        [--no-feedback-runs] [--scale compeft|stc] [--seed 0] [--out outputs/bench_compression]
        [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.cli import setup_logging  # noqa: E402
from fedpeft.compression import codec  # noqa: E402
from fedpeft.compression.compeft import compress  # noqa: E402
from fedpeft.config import load_config  # noqa: E402
from fedpeft.models import adapter_shapes  # noqa: E402
from simulations.common import last3_accuracy, run_or_reuse  # noqa: E402


def run(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """One simulation (reused if DIR/name already holds a finished run of this config)."""
    cfg = load_config(ROOT / "configs" / "mr.yaml", overrides)
    summary, rows = run_or_reuse(cfg, out / name)
    payload, bound, kept = (
        sum(r.get(k, 0) for r in rows)
        for k in ("uplink_payload_bytes", "uplink_bound_bytes", "uplink_kept_values")
    )
    return {
        "accuracy": last3_accuracy(rows),
        "uplink": summary["uplink_bytes_total"],
        "bits_per_kept": 8 * payload / kept if kept else None,
        "over_bound": payload / bound if bound else None,
        "minutes": summary["wall_seconds"] / 60,
        "cfg": cfg,
    }


def codec_seconds(
    shapes: dict[str, tuple[int, ...]], density: float, repeats: int = 20
) -> tuple[float, float]:
    """Median seconds to encode (ternarize + pack) and decode (unpack + dense) one update."""
    rng = np.random.default_rng(0)
    encode, decode = [], []
    for _ in range(repeats):
        update = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        start = time.perf_counter()
        sent, _ = compress(update, {}, density)
        packed = codec.pack(sent)
        encode.append(time.perf_counter() - start)
        start = time.perf_counter()
        codec.dense(codec.unpack(packed, shapes))
        decode.append(time.perf_counter() - start)
    return float(np.median(encode)), float(np.median(decode))


def plot(results: dict[str, dict[str, Any]], path: Path, scale: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for feedback, marker in ((True, "o"), (False, "s")):
        pts = sorted(
            (r["uplink"] / 1e6, r["accuracy"], r["density"])
            for r in results.values()
            if r["density"] is not None and r["feedback"] == feedback
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                    label="error feedback" if feedback else "no error feedback")  # fmt: skip
            for x, y, d in pts:
                ax.annotate(f"{d:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    fp32 = results["fp32"]
    ax.scatter([fp32["uplink"] / 1e6], [fp32["accuracy"]], marker="*", s=120, c="k", label="fp32")
    ax.set_xscale("log")
    ax.set_xlabel("total uplink (MB, log scale)")
    ax.set_ylabel("accuracy (mean of last 3 rounds)")
    ax.set_title(f"Top-k ternary uplink ({scale} scale), MiniLM on mr (labels: density)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.1, 0.05, 0.01])
    parser.add_argument(
        "--no-feedback-runs", action="store_true", help="only runs with error feedback"
    )
    parser.add_argument("--scale", choices=["compeft", "stc"], default="compeft")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_compression"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every run"
    )
    args = parser.parse_args()
    os.chdir(ROOT)
    setup_logging(verbose=False)
    out = Path(args.out) / f"seed{args.seed}"
    common = [f"federation.rounds={args.rounds}", f"seed={args.seed}", *args.set]

    results: dict[str, dict[str, Any]] = {}
    results["fp32"] = {**run("fp32", common, out), "density": None, "feedback": None}
    for feedback in (True,) if args.no_feedback_runs else (True, False):
        for d in args.densities:
            name = f"d{d:g}-{'ef' if feedback else 'noef'}" + (
                "-stc" if args.scale == "stc" else ""
            )
            overrides = [
                f"compression.scale={args.scale}",
                *common,
                f"compression.density={d}",
                f"compression.error_feedback={str(feedback).lower()}",
            ]
            results[name] = {**run(name, overrides, out), "density": d, "feedback": feedback}

    cfg = results["fp32"]["cfg"]
    shapes = adapter_shapes(cfg.model, cfg.lora, 2)
    fp32 = results["fp32"]
    header = (
        "| run | accuracy (last 3) | uplink MB | vs fp32 | bits / kept value | gap to bound "
        "| encode ms / update | decode ms / update |"
    )
    lines = [header, "|" + "---|" * 8]
    for r in results.values():
        if r["density"] is None:
            lines.append(
                f"| fp32 | {r['accuracy']:.4f} | {r['uplink'] / 1e6:.2f} | 1.0× | 32 | – | – | – |"
            )
            continue
        enc, dec = codec_seconds(shapes, r["density"])
        lines.append(
            f"| density {r['density']:g}, {'EF' if r['feedback'] else 'no EF'}, {args.scale} | {r['accuracy']:.4f} "
            f"| {r['uplink'] / 1e6:.3f} | {fp32['uplink'] / r['uplink']:.1f}× | {r['bits_per_kept']:.2f} "
            f"| {100 * (r['over_bound'] - 1):+.1f}% | {1e3 * enc:.1f} | {1e3 * dec:.1f} |"
        )
    table = "\n".join(lines)
    title = f"{args.rounds} rounds, 10 clients, Dirichlet(0.5), MiniLM r=8 q/v + head, mr, seed {args.seed}"
    print(f"\n{title}\n{table}")
    table_path, plot_path = (
        out / f"table-{args.scale}.md",
        out / f"accuracy_vs_uplink-{args.scale}.png",
    )
    table_path.write_text(f"{title}\n\n{table}\n")
    plot(results, plot_path, args.scale)
    print(f"\nwrote {table_path} and {plot_path}")


if __name__ == "__main__":
    main()
