"""Benchmark: federated instruction tuning of SmolLM2-135M-Instruct on sentence polarity.

configs/llm-mr.yaml: data/mr as an instruction task ("Is the sentiment of this
movie review positive or negative?" -> ``positive`` / ``negative``), LoRA r=8 on
q_proj/v_proj, 10 clients with Dirichlet(0.5) label skew, FedIT. Prints, in one run:

* zero-shot: the untouched base model's exact match and token loss on the held-out rows;
* central: LoRA trained in this process on as many examples as the federation trains on
  over all its rounds (rounds x clients x steps x batch, drawn from the union of the
  clients' partitions), with the same optimizer, batch and learning rate;
* federated: exact match, loss, uplink bytes and seconds per round;
* training tokens per second, and the peak memory of a training step (fedpeft.memory)
  and of this process.

Targets: federated within 1 point of central (mean of the last 3 rounds), both well
above zero-shot, a round of 10 clients on 2 cores under 3 minutes.

    python simulations/bench_llm.py [--set key=value ...] [--out DIR] [--skip-central]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.cli import setup_logging  # noqa: E402
from fedpeft.config import Config, load_config  # noqa: E402
from simulations.common import run_or_reuse  # noqa: E402


def _held_out(cfg: Config) -> tuple[Any, Any, Any]:
    from fedpeft.data import load_dataset
    from fedpeft.models import load_tokenizer
    from fedpeft.train import encode

    ds = load_dataset(cfg.data, cfg.model.task, cfg.seed)
    tok = load_tokenizer(cfg.model.name)
    return ds, tok, encode(ds.test, tok, cfg.model.max_length)


def _scores(model: Any, cfg: Config, tok: Any, test: Any) -> dict[str, Any]:
    from fedpeft.train import score

    metrics, samples = score(
        model, test, tok, cfg.eval, cfg.federation.eval_batch_size, "causal_lm"
    )
    return {**metrics, "samples": samples}


def full_test(cfg: Config, model: Any) -> dict[str, Any]:
    """Exact match on every held-out row (the rounds score ``data.max_test_samples`` of
    them): at 1066 rows its standard error is about a point."""
    full = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_test_samples=None))
    full = dataclasses.replace(full, eval=dataclasses.replace(cfg.eval, generate_examples=10**6))
    _, tok, test = _held_out(full)
    scores = _scores(model, full, tok, test)
    return {"exact_match": scores["exact_match"], "loss": scores["loss"], "rows": len(test)}


def zero_shot(cfg: Config) -> dict[str, Any]:
    """The base model as it ships: LoRA B starts at zero, so the adapted model is it."""
    from fedpeft.models import build_peft_model

    ds, tok, test = _held_out(cfg)
    model = build_peft_model(cfg.model, cfg.lora, ds.num_labels, init_seed=cfg.seed)
    return {**_scores(model, cfg, tok, test), "full_test": full_test(cfg, model)}


def federated_final(cfg: Config, run: Path) -> dict[str, Any]:
    """The federation's last global adapter (run/adapter) on every held-out row."""
    from peft import PeftModel

    from fedpeft.models import load_base_model

    model = PeftModel.from_pretrained(load_base_model(cfg.model, 2), str(run / "adapter"))
    return full_test(cfg, model)


def central(cfg: Config) -> dict[str, Any]:
    """One LoRA trained on the pooled client partitions, for the federation's number of
    training examples; its tokens per second and step memory are measured here too."""
    import numpy as np

    from fedpeft.client import client_data
    from fedpeft.memory import measure_step_memory
    from fedpeft.models import build_peft_model
    from fedpeft.train import Encoded, collate, train_local

    ds, tok, test = _held_out(cfg)
    parts = [client_data(cfg, pid).train for pid in range(cfg.partition.num_clients)]
    pooled = Encoded(
        input_ids=[x for p in parts for x in p.input_ids],
        labels=[x for p in parts for x in p.labels],
        targets=[x for p in parts for x in (p.targets or [])],
        prompts=[x for p in parts for x in (p.prompts or [])],
        references=[x for p in parts for x in (p.references or [])],
    )
    per_round = cfg.federation.sampled(cfg.partition.num_clients)
    steps = cfg.federation.rounds * per_round * cfg.train.local_steps
    model = build_peft_model(cfg.model, cfg.lora, ds.num_labels, init_seed=cfg.seed)
    memory = measure_step_memory(
        model, collate(pooled, list(range(cfg.train.batch_size)), tok.pad_token_id, "causal_lm")
    )
    train_cfg = dataclasses.replace(cfg.train, local_steps=steps)
    result = train_local(model, pooled, train_cfg, tok.pad_token_id, "causal_lm", seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # the same batches train_local drew
    from fedpeft.train import batch_indices

    tokens = sum(
        max(len(pooled.input_ids[i]) for i in index) * len(index)
        for index in batch_indices(len(pooled), cfg.train.batch_size, steps, rng)
    )
    return {
        **_scores(model, cfg, tok, test),
        "examples": result.num_examples,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "tokens_per_second": round(tokens / result.seconds, 1),
        "step_memory_mb": round(sum(memory.values()) / 2**20, 1),
        "full_test": full_test(cfg, model),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["round  exact_match    loss  uplink_MB  seconds  (server eval)"]
    for r in rows:
        lines.append(
            f"{r['round']:5d}  {r.get('exact_match', float('nan')):11.4f}  {r['loss']:6.4f}"
            f"  {r['uplink_bytes'] / 1e6:9.3f}  {r['seconds']:7.1f}"
            f"  ({r.get('server_eval_seconds', float('nan')):.1f})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_llm"))
    parser.add_argument("--skip-central", action="store_true", help="federated run only")
    args = parser.parse_args()
    os.chdir(ROOT)  # the config's data paths are relative to the project root
    setup_logging(verbose=False)
    cfg = load_config(ROOT / "configs" / "llm-mr.yaml", args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}

    start = time.time()
    figures["zero_shot"] = zero_shot(cfg)
    figures["zero_shot"]["seconds"] = round(time.time() - start, 1)
    print(f"zero-shot: exact match {figures['zero_shot']['exact_match']:.4f}, "
          f"loss {figures['zero_shot']['loss']:.4f}", flush=True)  # fmt: skip
    start = time.time()
    _, rows = run_or_reuse(cfg, out / "federated")
    wall = time.time() - start
    last3 = [r["exact_match"] for r in rows[-3:]]
    figures["federated"] = {
        "last3_exact_match": round(sum(last3) / len(last3), 4),
        "rounds": rows,
        "seconds_per_round": round(sum(r["seconds"] for r in rows) / len(rows), 1),
        # round 1 also waits for the Ray actors to start and load the model
        "seconds_per_later_round": round(
            sum(r["seconds"] for r in rows[1:]) / max(len(rows) - 1, 1), 1
        ),
        "wall_seconds": round(wall, 1),
        "full_test": federated_final(cfg, out / "federated"),
    }
    (out / "figures.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    if not args.skip_central:
        start = time.time()
        figures["central"] = central(cfg)
        figures["central"]["seconds"] = round(time.time() - start, 1)
        c = figures["central"]
        print(f"central ({c['examples']} examples, {c['steps']} steps): exact match "
              f"{c['exact_match']:.4f}, loss {c['loss']:.4f}, {c['tokens_per_second']} "
              f"training tokens/s", flush=True)  # fmt: skip
    (out / "figures.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")

    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    (out / "figures.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")

    print("\n" + _table(rows))
    fed = figures["federated"]
    print(f"\nzero-shot exact match:            {figures['zero_shot']['exact_match']:.4f}")
    if "central" in figures:
        c = figures["central"]
        print(f"central exact match:              {c['exact_match']:.4f}  "
              f"({c['examples']} examples, {c['train_seconds']} s)")  # fmt: skip
        print(f"federated - central:              {fed['last3_exact_match'] - c['exact_match']:+.4f}"
              " (target >= -0.01)")  # fmt: skip
        print(f"training tokens/s (central):      {c['tokens_per_second']}")
        print(f"step memory, batch {cfg.train.batch_size}:            {c['step_memory_mb']} MB")
    print(f"federated, mean of last 3 rounds: {fed['last3_exact_match']:.4f}")
    rows_full = fed["full_test"]["rows"]
    print(f"\nfinal adapters on all {rows_full} held-out rows (exact match):")
    print(f"  zero-shot {figures['zero_shot']['full_test']['exact_match']:.4f}, federated "
          f"{fed['full_test']['exact_match']:.4f}", end="")  # fmt: skip
    if "central" in figures:
        print(f", central {figures['central']['full_test']['exact_match']:.4f}", end="")
    print()
    print(f"seconds per round:                {fed['seconds_per_round']} (all rounds), "
          f"{fed['seconds_per_later_round']} (rounds 2+, actors started; target < 180)")  # fmt: skip
    print(f"uplink per round:                 {rows[-1]['uplink_bytes'] / 1e6:.3f} MB")
    print(f"peak RSS of this process:         {figures['peak_rss_mb']} MB")
    print(f"figures: {out / 'figures.json'}")


if __name__ == "__main__":
    main()
