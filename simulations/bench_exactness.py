"""Diagnostic: what exact aggregation of the LoRA products is worth, from the same updates.

FedIT averages A and B separately. With every client at the global rank, its product
differs from the exact mean of the clients' products by the covariance of their factors,

    Σ_k p_k s B'_k A'_k − s B̄' Ā' = s Σ_k p_k (B'_k − B̄')(A'_k − Ā'),

(FedIT's error; ``tests/test_aggregation.py`` checks it against the cross terms), and
FlexLoRA (``fedpeft.aggregation.flexlora``) removes it. This script asks whether removing
it helps. It follows a FedIT run in process, without Flower: every round each client
trains from the global adapters, and the *same* updates are aggregated several ways and
evaluated on the held-out set before FedIT's aggregate becomes the next global state:

- ``head only``: the averaged head, adapters as they were (what the adapters add is
  measured against this);
- ``fedit``, ``zero_pad``, ``flexlora`` (exact, then truncated to the global rank);
- ``exact``: the untruncated W + Σ_k p_k (s B'_k A'_k − s B_k A_k), merged into the base
  weights, so no rank limit applies.

It prints accuracy / loss per round and FedIT's error as a fraction of the exact round
update, ‖fedit − exact‖ / ‖exact − W‖ over all adapted weights.

    python simulations/bench_exactness.py [--rounds N] [--seed N] [--fleet] [--set key=value ...]

``--fleet`` uses the mixed fleet of ``bench_hetero.py`` (clients get FedIT's leading cut).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.aggregation import get_aggregator  # noqa: E402
from fedpeft.aggregation.base import ClientUpdate, State, lora_keys, module_of, product  # noqa: E402
from fedpeft.aggregation.flexlora import product_update_terms  # noqa: E402
from fedpeft.aggregation.lowrank import aggregate_svd  # noqa: E402
from fedpeft.cli import setup_logging  # noqa: E402
from fedpeft.client import _cached_model, client_data, round_seed  # noqa: E402
from fedpeft.config import Config, LoraConfig, load_config  # noqa: E402
from fedpeft.data import load_dataset  # noqa: E402
from fedpeft.models import (  # noqa: E402
    adapter_shapes,
    adapter_state,
    build_peft_model,
    load_adapter_state,
    load_tokenizer,
    set_base_deltas,
)
from fedpeft.planning import plan_clients  # noqa: E402
from fedpeft.train import Encoded, encode, evaluate, train_local  # noqa: E402
from simulations.bench_hetero import FLEET  # noqa: E402

COLUMNS = ("head only", "fedit", "zero_pad", "flexlora", "exact")


@dataclass
class Lab:
    """One federation in process: the fleet's plans, the clients' models and the
    held-out set, evaluated on a model of the global adapter's shape."""

    cfg: Config
    client_loras: dict[int, LoraConfig]
    model: Any  # the global PeftModel
    test: Encoded
    pad_id: int
    num_labels: int

    @classmethod
    def build(cls, cfg: Config) -> Lab:
        dataset = load_dataset(cfg.data, cfg.model.task, cfg.seed)
        fleet = plan_clients(cfg, dataset.num_labels)
        tok = load_tokenizer(cfg.model.name)
        model = build_peft_model(
            cfg.model, fleet.global_lora, dataset.num_labels, init_seed=cfg.seed
        )
        test = encode(dataset.test, tok, cfg.model.max_length)
        return cls(cfg, fleet.client_loras, model, test, tok.pad_token_id, dataset.num_labels)

    def train_clients(self, global_state: State, server_round: int) -> list[ClientUpdate]:
        """Every client trains FedIT's cut of ``global_state`` as in a real round."""
        cut, scaling = get_aggregator("fedit"), self.cfg.lora.scaling_for
        updates = []
        for pid, lora in self.client_loras.items():
            model = _cached_model(self.cfg.model, lora, self.num_labels, False)  # one per plan
            sent = cut.cut(
                global_state, adapter_shapes(self.cfg.model, lora, self.num_labels), scaling
            )
            load_adapter_state(model, sent)
            seed = round_seed(self.cfg.seed, server_round, pid)
            result = train_local(
                model, client_data(self.cfg, pid).train, self.cfg.train, self.pad_id,
                self.cfg.model.task, seed,
            )  # fmt: skip
            after = adapter_state(model)
            delta = {k: after[k] - sent[k] for k in sent}
            updates.append(ClientUpdate(pid, delta, float(result.num_examples), sent))
        return updates

    def evaluate(
        self, state: State, base_deltas: dict[str, np.ndarray] | None = None
    ) -> tuple[float, float]:
        """(accuracy, loss) on the held-out set of ``state`` on top of ``base_deltas``."""
        set_base_deltas(self.model, base_deltas or {})
        load_adapter_state(self.model, state)
        metrics = evaluate(
            self.model, self.test, self.cfg.federation.eval_batch_size, self.pad_id,
            self.cfg.model.task,
        )  # fmt: skip
        set_base_deltas(self.model, {})
        return metrics["accuracy"], metrics["loss"]


def products(state: State, scaling: Any) -> dict[str, np.ndarray]:
    """s B A per adapted module."""
    modules = sorted({m for k in state if (m := module_of(k)) is not None})
    return {module: product(state, module, scaling) for module in modules}


def exact_products(
    global_state: State, old: dict[str, np.ndarray], updates: list[ClientUpdate], scaling: Any
) -> dict[str, np.ndarray]:
    """W + Σ_k p_k (s B'_k A'_k − s B_k A_k) per module, untruncated (W = ``old`` where no
    client trained the module)."""
    out = {}
    for module, w in old.items():
        terms = product_update_terms(global_state, updates, module, scaling)
        out[module] = aggregate_svd(terms).dense() if terms else w
    return out


def compare(lab: Lab, global_state: State, updates: list[ClientUpdate]) -> dict[str, Any]:
    """(accuracy, loss) of each aggregate of ``updates``, and FedIT's relative error."""
    scaling = lab.cfg.lora.scaling_for
    states = {n: get_aggregator(n).aggregate(global_state, updates, scaling) for n in COLUMNS[1:4]}
    head = {k: v for k, v in states["fedit"].items() if module_of(k) is None}
    row: dict[str, Any] = {"head only": lab.evaluate({**global_state, **head})}
    row.update({name: lab.evaluate(state) for name, state in states.items()})
    old = products(global_state, scaling)
    exact = exact_products(global_state, old, updates, scaling)
    no_adapters = {**global_state, **head}
    for module in exact:
        _, key_b = lora_keys(module)
        no_adapters[key_b] = np.zeros_like(global_state[key_b])
    row["exact"] = lab.evaluate(no_adapters, exact)
    fedit = products(states["fedit"], scaling)
    error = sum(np.linalg.norm(fedit[m] - exact[m]) ** 2 for m in exact)
    change = sum(np.linalg.norm(exact[m] - old[m]) ** 2 for m in exact)
    row["fedit error"] = float(np.sqrt(error / change))
    return row


def format_row(label: str, row: dict[str, Any]) -> str:
    """One line: accuracy / loss per aggregate, then FedIT's error."""
    cells = "".join(f"{row[c][0]:>8.4f} /{row[c][1]:>6.3f}" for c in COLUMNS)
    return f"{label:<7}{cells}{row['fedit error']:>13.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fleet", action="store_true", help="the mixed fleet of bench_hetero")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)"
    )
    args = parser.parse_args()
    os.chdir(ROOT)
    setup_logging(verbose=False)
    overrides = [f"seed={args.seed}", *args.set, *(FLEET if args.fleet else [])]
    cfg = load_config(ROOT / "configs" / "mr.yaml", overrides)
    lab = Lab.build(cfg)
    state = adapter_state(lab.model)
    fedit = get_aggregator("fedit")
    print("accuracy / loss on the held-out set")
    print(f"{'round':<7}" + "".join(f"{c:>16}" for c in COLUMNS) + f"{'fedit error':>13}")
    rows = []
    for server_round in range(1, args.rounds + 1):
        updates = lab.train_clients(state, server_round)
        row = compare(lab, state, updates)
        rows.append(row)
        print(format_row(str(server_round), row), flush=True)
        state = fedit.aggregate(state, updates, cfg.lora.scaling_for)
    mean: dict[str, Any] = {c: tuple(np.mean([r[c] for r in rows], axis=0)) for c in COLUMNS}
    mean["fedit error"] = float(np.mean([r["fedit error"] for r in rows]))
    print(format_row("mean", mean))
    fleet = "mixed fleet" if args.fleet else "homogeneous"
    print(f"\n{fleet}, seed {args.seed}, {args.rounds} rounds along FedIT's trajectory", *args.set)


if __name__ == "__main__":
    main()
