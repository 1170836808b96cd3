"""Benchmark: a mixed device fleet under each aggregator, against a homogeneous r=8 fleet.

MiniLM on data/mr, 10 clients, Dirichlet(0.5), the local recipe of
configs/mr.yaml. The mixed fleet (configs/devices/bench/) has phones (depth 2, ranks
1-2), single-board computers (depth 4, ranks 2-4), tablets (all 6 layers, ranks 4-8) and
laptops (all 6 layers, ranks 8-16), planned from their memory budgets. Prints accuracy
(mean of the last 3 rounds), total uplink and downlink bytes and wall time per run, and each
profile's plan with its estimated and measured training-step memory.

    python simulations/bench_hetero.py [--rounds N] [--aggregators flexlora flora zero_pad fedit]
        [--scaling fixed|standard|rslora] [--homogeneous fedit ...] [--no-homogeneous]
        [--seed N] [--set key=value ...]

    python simulations/bench_hetero.py --baselines [--seeds 0 1 2 10 11] [--rounds 15]
        [--fleets mixed bucket ...] [--task mr|llm] [--set federation.server_optimizer=momentum ...]

``--baselines`` runs the fleets a user would pick instead of heterogeneous adapters
(``fleet.policy``), each under the default aggregator, over several seeds, and prints
accuracy (mean of the last 3 rounds) per seed and the worst drop after round 5 below
the best round so far (collapse or oscillation):

- ``mixed``: the mixed fleet, every device at its own plan (``fleet.policy: adapt``);
- ``bucket``: every client at the plan the weakest device affords;
- ``exclude``: only the devices that afford r = 8 on all layers (the laptops) train;
- ``reference``: every client at r = 8 on all layers (a fleet of capable devices);
- ``ceiling``: every client at the laptop's plan (the strongest);
- ``mixed-stress``, ``bucket-stress``, ``exclude-stress``: the same devices with
  capacity tied to the labels (``fleet.assign: skewed``: the weakest devices hold the
  partitions with the most examples of label 0), reported separately.

``--task llm`` runs the same fleets on configs/llm-mr.yaml (mr as instructions to
SmolLM2-135M-Instruct) with the profiles of configs/devices/bench-llm/, whose memory
budgets give the phones 3 of 30 layers and the laptops all 30 (``fedpeft plan`` shows it).

``--scaling`` is the mixed fleet's ``lora.scaling``. The homogeneous fleet has one rank
(r = 8 = lora.r), where every rule gives the same alpha / 8; ``--homogeneous`` names the
aggregators it runs under (default fedit, the reference). ``--set`` applies to every run,
homogeneous included. A run whose directory already holds a finished run of the same
config is reused, so a benchmark killed halfway resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.cli import setup_logging  # noqa: E402
from fedpeft.config import load_config  # noqa: E402
from fedpeft.planning import format_plan, plan_fleet  # noqa: E402
from simulations.common import run_or_reuse  # noqa: E402

# --task: the run config and the device profiles whose memory budgets fit its model
TASKS = {
    "mr": ("configs/mr.yaml", "configs/devices/bench"),
    "llm": ("configs/llm-mr.yaml", "configs/devices/bench-llm"),
}


def fleet(devices: str) -> list[str]:
    """The mixed fleet: 3 phones, 3 boards, 2 tablets, 2 laptops, ranks up to 16."""
    names = ("phone", "pi", "tablet", "laptop")
    return [
        f"fleet.profiles=[{', '.join(str(ROOT / devices / f'{n}.yaml') for n in names)}]",
        "fleet.mix={phone: 3, pi: 3, tablet: 2, laptop: 2}",
        "fleet.max_rank=16",
    ]


def baseline_fleets(devices: str) -> dict[str, list[str]]:
    """Each fleet of ``--baselines``, as overrides of the task's config."""
    mixed = fleet(devices)
    fleets = {
        "mixed": mixed,
        "bucket": [*mixed, "fleet.policy=bucket"],
        "exclude": [*mixed, "fleet.policy=exclude"],
        "reference": [],  # the config's lora section on every client: r=8 on all layers
        "ceiling": [mixed[0], "fleet.mix={laptop: 10}", "fleet.max_rank=16"],
    }
    # the stress fleet: the same devices, the weakest given the partitions that hold the
    # most of one label (fleet.assign: skewed); reference and ceiling have one profile
    stress = {
        f"{name}-stress": [*fleets[name], "fleet.assign=skewed"]
        for name in ("mixed", "bucket", "exclude")
    }
    return {**fleets, **stress}


FLEET_NAMES = [*baseline_fleets(TASKS["mr"][1])]
FLEET = fleet(TASKS["mr"][1])
STABLE_AFTER = 5  # rounds: the target's "after round 5"


def run(
    name: str, overrides: list[str], out: Path, config: str = TASKS["mr"][0]
) -> dict[str, float]:
    cfg = load_config(ROOT / config, overrides)
    summary, rows = run_or_reuse(cfg, out / name)
    # the LLM's score is the exact match of its generated label word
    key = "accuracy" if cfg.model.task == "classification" else "exact_match"
    score = [r[key] for r in rows]
    return {
        "accuracy": sum(score[-3:]) / len(score[-3:]),  # as last3_accuracy
        "uplink": summary["uplink_bytes_total"],
        "downlink": summary["downlink_bytes_total"],
        "minutes": summary["wall_seconds"] / 60,
        "worst_drop": worst_drop(score),
    }


def worst_drop(accuracy: list[float], after: int = STABLE_AFTER) -> float:
    """The largest fall of a round after ``after`` below the best round before it."""
    drops = [max(accuracy[:i]) - accuracy[i] for i in range(after, len(accuracy))]
    return max([0.0, *drops])


def baselines(args: argparse.Namespace) -> None:
    """The fleets asked for (``--fleets``: of baseline_fleets) on every seed; the
    table of the issue's target."""
    out = Path(args.out)
    config, devices = TASKS[args.task]
    fleets = baseline_fleets(devices)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for seed in args.seeds:
        base = [f"federation.rounds={args.rounds}", f"seed={seed}", *args.set]
        for fleet in args.fleets:
            name = "homogeneous" if fleet == "reference" else fleet  # reuse earlier runs
            results.setdefault(fleet, {})[seed] = run(
                name, [*base, *fleets[fleet]], out / f"seed{seed}", config
            )
    extra = f", {' '.join(args.set)}" if args.set else ""
    task = "mr" if args.task == "mr" else "mr as instructions to SmolLM2-135M"
    print(f"\n{args.rounds} rounds, 10 clients, {task}, {aggregator(config, args.set)}{extra}")
    seeds = "".join(f"{f'seed {s}':>9}" for s in args.seeds)
    print(f"{'fleet':<11}{seeds}{'mean':>8}{'worst drop':>12}{'uplink MB':>11}{'min/run':>9}")
    for fleet, by_seed in results.items():
        acc = [by_seed[s]["accuracy"] for s in args.seeds]
        cells = "".join(f"{a:>9.4f}" for a in acc)
        drop = max(r["worst_drop"] for r in by_seed.values())
        uplink = sum(r["uplink"] for r in by_seed.values()) / len(by_seed) / 1e6
        minutes = sum(r["minutes"] for r in by_seed.values()) / len(by_seed)
        print(
            f"{fleet:<11}{cells}{sum(acc) / len(acc):>8.4f}{drop:>12.4f}"
            f"{uplink:>11.1f}{minutes:>9.1f}"
        )


def aggregator(config: str, overrides: list[str]) -> str:
    """The aggregator and server optimizer the runs use, as the table's caption says."""
    fed = load_config(ROOT / config, overrides).federation
    return f"{fed.aggregator}, server optimizer {fed.server_optimizer}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument(
        "--aggregators", nargs="*", default=["flexlora", "flora", "zero_pad", "fedit"]
    )
    parser.add_argument("--homogeneous", nargs="+", default=["fedit"], metavar="AGGREGATOR")
    parser.add_argument("--scaling", default="fixed", choices=["fixed", "standard", "rslora"])
    parser.add_argument("--no-homogeneous", action="store_true", help="skip the reference run")
    parser.add_argument("--seed", type=int, default=0, help="partitions, init, sampling, batches")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_hetero"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)"
    )
    parser.add_argument("--baselines", action="store_true", help="the fleets a user would pick")
    parser.add_argument(
        "--task", default="mr", choices=[*TASKS],
        help="with --baselines: MiniLM on mr, or mr as instructions to SmolLM2-135M",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 10, 11])
    parser.add_argument(
        "--fleets", nargs="+", default=FLEET_NAMES, choices=FLEET_NAMES,
        help="with --baselines: which fleets (default all, the stress fleets last)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.task != "mr" and not args.baselines:
        parser.error("--task applies to --baselines only")
    if args.baselines and args.rounds <= STABLE_AFTER:
        parser.error(f"--rounds should be above {STABLE_AFTER}: stability is judged after it")
    os.chdir(ROOT)
    setup_logging(verbose=False)
    if args.baselines:
        baselines(args)
        return
    out = Path(args.out)
    base = [f"federation.rounds={args.rounds}", f"seed={args.seed}", *args.set]
    out = out / f"seed{args.seed}"

    fleet_cfg = load_config(ROOT / "configs" / "mr.yaml", [*args.set, *FLEET])
    print(format_plan(plan_fleet(fleet_cfg, measure=True)))
    results = {}
    for agg in [] if args.no_homogeneous else args.homogeneous:
        name = "homogeneous" if agg == "fedit" else f"homogeneous-{agg}"  # fedit: earlier runs
        results[f"homogeneous r=8 ({agg})"] = run(
            name, [*base, f"federation.aggregator={agg}"], out
        )
    scaling = f"lora.scaling={args.scaling}"
    for agg in args.aggregators:
        results[f"mixed fleet ({agg}, {args.scaling})"] = run(
            f"{agg}-{args.scaling}",
            [*base, f"federation.aggregator={agg}", scaling, *FLEET],
            out,
        )

    overrides = f", {' '.join(args.set)}" if args.set else ""
    print(f"\n{args.rounds} rounds, 10 clients, mr, seed {args.seed}{overrides}")
    print(f"{'run':<36}{'accuracy (last 3)':>18}{'uplink MB':>11}{'downlink MB':>13}{'minutes':>9}")
    for name, r in results.items():
        print(
            f"{name:<36}{r['accuracy']:>18.4f}{r['uplink'] / 1e6:>11.1f}"
            f"{r['downlink'] / 1e6:>13.1f}{r['minutes']:>9.1f}"
        )


if __name__ == "__main__":
    main()
