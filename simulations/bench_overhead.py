"""Benchmark: what Flower's simulation runtime costs on top of the client work itself.

The same client work (MiniLM on data/mr, 10 clients, 10 local steps of 16 per
round, FedIT) is run two ways in one process:

1. through ``fedpeft simulate`` (Flower ServerApp + ClientApp on the Ray backend), with
   a client mod that times every message handler inside the Ray actor;
2. as a plain sequential loop calling the same :func:`fedpeft.client.train_round` and the
   same aggregator, with no Flower at all.

Server-side evaluation is off in both so that only the federated work is compared. Prints
the wall-time ratio (fedpeft / plain) and where the difference goes.

    python simulations/bench_overhead.py [--rounds 4] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from clients.app import make_client_app  # noqa: E402
from fedpeft import client, data, models, traffic, wire  # noqa: E402
from fedpeft.aggregation import ClientUpdate, get_aggregator, server_step  # noqa: E402
from fedpeft.cli import setup_logging, simulate  # noqa: E402
from fedpeft.config import Config, load_config, lora_to_json  # noqa: E402


def timed_client_app(log_path: Path) -> ClientApp:
    """fedpeft's ClientApp behind a mod that logs each handler's time in the actor."""

    def timer(msg: Message, context: Context, call_next: Any) -> Message:
        start = time.perf_counter()
        reply = call_next(msg, context)
        handler = time.perf_counter() - start
        entry = {"type": msg.metadata.message_type, "handler_s": handler, "pid": os.getpid()}
        if msg.metadata.message_type == "train":
            metrics = reply.content.metric_records[wire.METRICS]
            entry["train_s"] = float(metrics["train-seconds"])  # type: ignore[arg-type]
        with log_path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return reply

    return make_client_app(mods=[timer])


def clear_process_caches() -> None:
    """Forget loaded models and data so the plain loop pays its own loading costs."""
    for cached in (
        models._cached_base,
        models.load_tokenizer,
        data._load_dataset_cached,
        data._partitions,
        client._cached_model,
        client._client_data,
    ):
        cached.cache_clear()


def plain_loop(cfg: Config) -> dict[str, float]:
    """The same rounds with no Flower: one process, clients one after another, the same
    aggregator and server step."""
    start = time.perf_counter()
    dataset = data.load_dataset(cfg.data, cfg.model.task, cfg.seed)
    model = models.build_peft_model(cfg.model, cfg.lora, dataset.num_labels, init_seed=cfg.seed)
    state = models.adapter_state(model)
    aggregator = get_aggregator(cfg.federation.aggregator)
    config_json, lora_json = cfg.to_json(), lora_to_json(cfg.lora)
    setup = time.perf_counter() - start
    train_s = 0.0
    for server_round in range(1, cfg.federation.rounds + 1):
        updates = []
        for pid in range(cfg.partition.num_clients):
            ins = wire.TrainIns(
                server_round, config_json, dataset.num_labels, state, lora_json, pid
            )
            res, _ = client.train_round(ins)
            train_s += res.train_seconds or 0.0
            updates.append(ClientUpdate(pid, res.update, res.num_examples, sent=state))
        aggregate = aggregator.aggregate(state, updates, cfg.lora.scaling_for)
        state = server_step(state, aggregate, cfg.federation.server_lr)
    return {"wall": time.perf_counter() - start, "setup": setup, "train": train_s}


def codec_seconds(cfg: Config, repeats: int = 20) -> float:
    """Encode + decode (with validation and byte counting) of one train round trip."""
    num_labels = data.load_dataset(cfg.data, cfg.model.task, cfg.seed).num_labels
    state = models.adapter_state(models.build_peft_model(cfg.model, cfg.lora, num_labels))
    ins = wire.TrainIns(1, cfg.to_json(), num_labels, state, lora_to_json(cfg.lora), 0)
    start = time.perf_counter()
    for _ in range(repeats):
        content = wire.encode_train_ins(ins)
        traffic.record_bytes(content)
        got = wire.decode_train_ins(content)
        reply = wire.encode_train_res(wire.TrainRes(got.adapters, 160, 0.5, 1.0))
        traffic.record_bytes(reply)
        wire.decode_train_res(reply, state, 160)
    return (time.perf_counter() - start) / repeats


def fedpeft_run(cfg: Config, out: Path) -> dict[str, float]:
    tap = out / "handlers.jsonl"
    start = time.perf_counter()
    simulate(cfg, out / "run", client_app=timed_client_app(tap))
    wall = time.perf_counter() - start
    entries = [json.loads(line) for line in tap.read_text().splitlines()]
    rounds = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in entries if e["type"] == "train"]
    first_per_actor: dict[int, float] = {}
    for e in train:  # the first message an actor handles pays for loading model and data
        first_per_actor.setdefault(e["pid"], e["handler_s"] - e["train_s"])
    return {
        "wall": wall,
        "rounds": sum(r["seconds"] for r in rounds),
        "handlers": sum(e["handler_s"] for e in entries),
        "train": sum(e["train_s"] for e in train),
        "actor_first_load": sum(first_per_actor.values()),
        "actors": len(first_per_actor),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    os.chdir(ROOT)
    setup_logging(verbose=False)
    overrides = [f"federation.rounds={args.rounds}", "federation.server_eval=false", *args.set]
    cfg = load_config(ROOT / "configs" / "mr.yaml", overrides)
    out = Path(tempfile.mkdtemp(prefix="fedpeft-overhead-"))

    fed = fedpeft_run(cfg, out)
    clear_process_caches()
    plain = plain_loop(cfg)

    n_msgs = cfg.federation.rounds * cfg.partition.num_clients
    print(f"\nworkload: {cfg.partition.num_clients} clients x {cfg.federation.rounds} rounds x "
          f"{cfg.train.local_steps} steps of {cfg.train.batch_size} (MiniLM, mr)")  # fmt: skip
    print(
        f"plain loop   : {plain['wall']:7.1f} s  (setup {plain['setup']:.1f} s, training {plain['train']:.1f} s)"
    )
    print(
        f"fedpeft/Flower: {fed['wall']:7.1f} s  (training {fed['train']:.1f} s in {fed['actors']} actor(s))"
    )
    print(f"ratio fedpeft / plain: {fed['wall'] / plain['wall']:.3f}  (target <= 1.3)")
    print("\nwhere the difference goes (fedpeft run):")
    startup = fed["wall"] - fed["rounds"]
    print(
        f"  before round 1 and after the last (Ray start, actor spawn, query, outputs): {startup:6.1f} s"
    )
    print(
        f"  first message per actor (imports, model + data load):                      {fed['actor_first_load']:6.1f} s"
    )
    codec = codec_seconds(cfg) * n_msgs
    print(
        f"  encode + decode + byte count of {n_msgs} train round trips (timed apart): {codec:6.2f} s"
    )
    other = fed["rounds"] - fed["handlers"]
    print(
        f"  in rounds but outside client handlers (messaging, aggregation, checkpoint):  {other:6.1f} s"
    )
    print(
        f"  = {other / cfg.federation.rounds:.2f} s per round of {cfg.partition.num_clients} clients"
    )


if __name__ == "__main__":
    main()
