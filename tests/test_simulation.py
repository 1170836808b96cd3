"""End to end with tiny models: the main run on Flower's simulation runtime (Ray), the
others in process (``simulation.runtime: inprocess``, real messages and ClientApps
without Ray; tests/test_golden.py shows the two compute the same bits). ``TINY`` runs
in process; a test that needs Ray says so.

A client mod taps every message a ClientApp receives and sends, so the tests check what
really crossed the wire against what the server logged.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.app import make_client_app
from fedpeft import traffic, wire
from fedpeft.cli import main, simulate
from fedpeft.config import Config, config_from_dict
from fedpeft.data import load_dataset
from fedpeft.models import adapter_state, build_peft_model, load_base_model, load_tokenizer
from fedpeft.train import encode, evaluate

pytestmark = pytest.mark.slow
# the tests of the module's one simulation (the ``run`` fixture) share a pytest-xdist
# worker, so that it runs once, not once per worker
SHARES_THE_RUN = pytest.mark.xdist_group("simulation-run")

TINY = {
    "seed": 3,
    "model": {"name": "tiny-bert", "max_length": 32},
    "lora": {"r": 4},
    "data": {"synthetic_samples": 300, "synthetic_classes": 3, "test_fraction": 0.2},
    "partition": {
        "num_clients": 3,
        "scheme": "dirichlet",
        "alpha": 1.0,
        "client_test_fraction": 0.2,
    },
    "train": {"local_steps": 4, "batch_size": 8, "lr": 5e-3},
    "federation": {"rounds": 2, "min_clients": 2, "client_eval": True},
    "simulation": {"client_cpus": 1, "runtime": "inprocess"},
}
ON_RAY = {**TINY, "simulation": {"client_cpus": 1, "runtime": "ray"}}


def tapped_client_app(log_path: Path) -> ClientApp:
    def tap(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        entry: dict[str, Any] = {"type": msg.metadata.message_type}
        if msg.metadata.message_type in ("train", "evaluate"):
            ins = wire.decode_train_ins(msg.content)
            entry["round"], entry["partition"] = ins.server_round, ins.partition_id
            entry["node_partition"] = context.node_config["partition-id"]
        entry["in_records"] = sorted(msg.content.array_records)
        entry["in_bytes"] = traffic.record_bytes(msg.content)
        entry["out_bytes"] = traffic.record_bytes(reply.content)
        entry["in_arrays"] = {
            k: list(a.shape) for r in msg.content.array_records.values() for k, a in r.items()
        }
        entry["out_arrays"] = {
            k: list(a.shape) for r in reply.content.array_records.values() for k, a in r.items()
        }
        with log_path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return reply

    return make_client_app(mods=[tap])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sim")
    cfg = config_from_dict(ON_RAY)
    tap_log = out / "tap.jsonl"
    simulate(cfg, out / "run", client_app=tapped_client_app(tap_log))
    return {"cfg": cfg, "out": out / "run", "tap": _read_jsonl(tap_log), "base": out}


@SHARES_THE_RUN
def test_outputs_follow_the_contract(run: dict[str, Any]) -> None:
    rows = _read_jsonl(run["out"] / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        for key in (
            "accuracy",
            "uplink_bytes",
            "downlink_bytes",
            "clients",
            "rejected",
            "epsilon",
            "seconds",
        ):
            assert key in r
        assert sorted(r["clients"]) == [0, 1, 2] and r["rejected"] == [] and r["epsilon"] is None
        assert 0.0 <= r["accuracy"] <= 1.0
        assert set(r["client_eval"]) >= {"accuracy", "loss"}
    summary = json.loads((run["out"] / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["config"]["seed"] == 3
    assert summary["uplink_bytes_total"] == sum(r["uplink_bytes"] for r in rows)
    assert {p.name for p in (run["out"] / "plots").glob("*.png")} == {"accuracy.png", "bytes.png"}
    assert (run["out"] / "adapter" / "adapter_config.json").is_file()
    assert (run["out"] / "adapter" / "adapter_model.safetensors").is_file()


@SHARES_THE_RUN
def test_only_adapter_tensors_cross_the_wire(run: dict[str, Any]) -> None:
    cfg: Config = run["cfg"]
    ds = load_dataset(cfg.data, cfg.model.task, cfg.seed)
    model = build_peft_model(cfg.model, cfg.lora, ds.num_labels)
    exchanged = {k: list(v.shape) for k, v in adapter_state(model).items()}
    base_names = {n for n, _ in load_base_model(cfg.model, ds.num_labels).named_parameters()}
    train_msgs = [e for e in run["tap"] if e["type"] == "train"]
    assert len(train_msgs) == 6  # 3 clients x 2 rounds
    # every node is told to train its own partition, each partition once a round
    assert all(e["partition"] == e["node_partition"] for e in train_msgs)
    assert sorted(e["partition"] for e in train_msgs) == [0, 0, 1, 1, 2, 2]
    for entry in run["tap"]:
        for arrays in (entry["in_arrays"], entry["out_arrays"]):
            assert arrays in ({}, exchanged)
            assert not set(arrays) & base_names
    assert all(e["out_arrays"] == exchanged and e["in_arrays"] == exchanged for e in train_msgs)


@SHARES_THE_RUN
def test_logged_bytes_equal_the_bytes_in_the_messages(run: dict[str, Any]) -> None:
    up: dict[int, int] = defaultdict(int)
    down: dict[int, int] = defaultdict(int)
    for e in run["tap"]:
        if "round" in e:
            up[e["round"]] += e["out_bytes"]
            down[e["round"]] += e["in_bytes"]
    rows = _read_jsonl(run["out"] / "metrics.jsonl")
    assert [r["uplink_bytes"] for r in rows] == [up[1], up[2]]
    assert [r["downlink_bytes"] for r in rows] == [down[1], down[2]]
    # and they are the fp32 adapters plus framing: under 600 bytes per array (name, dtype,
    # shape, chunk ids) and 1 kB per message
    n_params = json.loads((run["out"] / "summary.json").read_text())["adapter_parameters"]
    for e in run["tap"]:
        if e["type"] == "train":
            assert 4 * n_params < e["out_bytes"] < 4 * n_params + 600 * len(e["out_arrays"]) + 1024


@SHARES_THE_RUN
def test_saved_adapter_reproduces_the_federated_model(run: dict[str, Any]) -> None:
    from peft import PeftModel

    cfg: Config = run["cfg"]
    ds = load_dataset(cfg.data, cfg.model.task, cfg.seed)
    base = load_base_model(cfg.model, ds.num_labels)
    loaded = PeftModel.from_pretrained(base, str(run["out"] / "adapter"))
    tok = load_tokenizer(cfg.model.name)
    metrics = evaluate(
        loaded, encode(ds.test, tok, cfg.model.max_length), 64, tok.pad_token_id, "classification"
    )
    last = _read_jsonl(run["out"] / "metrics.jsonl")[-1]
    assert metrics["accuracy"] == pytest.approx(last["accuracy"], abs=1e-6)
    assert metrics["loss"] == pytest.approx(last["loss"], abs=1e-5)


def test_same_seed_same_metrics_other_seed_differs(tmp_path: Path) -> None:
    simulate(config_from_dict(TINY), tmp_path / "once")
    simulate(config_from_dict(TINY), tmp_path / "again")
    first = [(r["accuracy"], r["loss"]) for r in _read_jsonl(tmp_path / "once" / "metrics.jsonl")]
    second = [(r["accuracy"], r["loss"]) for r in _read_jsonl(tmp_path / "again" / "metrics.jsonl")]
    assert first == second
    other = tmp_path / "other"
    simulate(config_from_dict({**TINY, "seed": 4}), other)
    third = [(r["accuracy"], r["loss"]) for r in _read_jsonl(other / "metrics.jsonl")]
    assert third != first


def test_instruction_tuning_federation_and_generate(tmp_path: Path, capsys: Any) -> None:
    """tiny-llama (SmolLM2's tokenizer and chat template) on the synthetic topics asked as
    questions: exact match and perplexity per round, samples.jsonl, and ``fedpeft
    generate`` answering with the saved adapter exactly as the server's model did."""

    raw = {
        **TINY,
        "model": {"name": "tiny-llama", "task": "causal_lm", "max_length": 64},
        "partition": {"num_clients": 2, "scheme": "iid"},
        "train": {"local_steps": 3, "batch_size": 4, "lr": 5e-2},
        "federation": {"rounds": 2, "min_clients": 2, "eval_batch_size": 16},
        "eval": {"max_new_tokens": 5, "generate_examples": 10, "samples": 2},
    }
    out = tmp_path / "lm"
    simulate(config_from_dict(raw), out)
    rows = _read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and "accuracy" not in rows[0]
    assert all(0 <= r["exact_match"] <= 1 and np.isfinite(r["perplexity"]) for r in rows)
    assert (out / "plots" / "exact_match.png").is_file()
    samples = _read_jsonl(out / "samples.jsonl")
    assert [s["round"] for s in samples] == [0, 0, 1, 1, 2, 2]
    last = samples[-1]
    assert last["reference"] in ("sports", "food", "technology")
    user = (
        last["prompt"]
        .split("<|im_start|>user\n")[1]
        .removesuffix("<|im_end|>\n<|im_start|>assistant\n")
    )
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", user, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == last["generation"].strip()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "lora.rank=3"], "Unknown config key 'lora.rank'"),
        (
            ["--set", "data.source=/nowhere/train.jsonl"],
            "Data file '/nowhere/train.jsonl' does not exist.",
        ),
        (
            ["--set", "model.name=/nowhere/model"],
            "Model directory '/nowhere/model' does not exist.",
        ),
    ],
)
def test_cli_user_mistakes_are_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    # in this process: ``main`` is what the console script runs (tests/test_cli.py runs
    # the real command in its own process)
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    assert main(["simulate", str(config), "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err


@pytest.mark.parametrize("aggregator", ["flexlora", "zero_pad"])  # flora: its own test
def test_mixed_fleet_trains_end_to_end(tmp_path: Path, aggregator: str) -> None:
    """Two device profiles: the small one gets LoRA on the top layer only, the large one
    on both layers at higher rank; both train, each message carries only its own plan."""
    small, large = tmp_path / "small.yaml", tmp_path / "large.yaml"
    small.write_text("name: small\nmemory_mb: 4.6\n")  # tiny BERT: ~4.3 MiB at depth 1
    large.write_text("name: large\nmemory_mb: 64\n")
    raw = {
        **TINY,
        "partition": {"num_clients": 3, "scheme": "iid"},
        "federation": {"rounds": 2, "min_clients": 2, "aggregator": aggregator},
        "fleet": {
            "profiles": [str(small), str(large)],
            "mix": {"small": 1, "large": 2},
            "max_rank": 8,
        },
    }
    tap = tmp_path / "tap.jsonl"
    simulate(config_from_dict(raw), tmp_path / "run", client_app=tapped_client_app(tap))
    rows = _read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(sorted(r["clients"]) == [0, 1, 2] and r["rejected"] == [] for r in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(summary["client_profiles"].values()) == ["large", "large", "small"]
    shapes = {
        json.dumps(e["in_arrays"], sort_keys=True) for e in _read_jsonl(tap) if e["type"] == "train"
    }
    assert len(shapes) == 2  # two plans on the wire
    plans = [json.loads(s) for s in shapes]
    small_plan = min(plans, key=len)
    assert all(".layer.1." in k or "classifier" in k for k in small_plan)
    ranks = {v[0] for k, v in max(plans, key=len).items() if "lora_A" in k}
    assert ranks == {4, 8}  # lower layer at half the top rank
    _assert_saved_adapter_reproduces(config_from_dict(raw), tmp_path / "run", rows[-1])


def _assert_saved_adapter_reproduces(cfg: Config, out: Path, last: dict[str, Any]) -> None:
    """``PeftModel.from_pretrained`` on DIR/adapter gives the model the server evaluated
    (ranks, per-layer scaling and, for FLoRA, the merged updates)."""
    from peft import PeftModel

    ds = load_dataset(cfg.data, cfg.model.task, cfg.seed)
    loaded = PeftModel.from_pretrained(
        load_base_model(cfg.model, ds.num_labels), str(out / "adapter")
    )
    tok = load_tokenizer(cfg.model.name)
    test = encode(ds.test, tok, cfg.model.max_length)
    metrics = evaluate(loaded, test, 64, tok.pad_token_id, "classification")
    assert metrics["loss"] == pytest.approx(last["loss"], abs=1e-4)
    assert metrics["accuracy"] == pytest.approx(last["accuracy"], abs=1e-6)


def test_flora_merges_into_every_base_and_exports_an_exact_adapter(tmp_path: Path) -> None:
    """FLoRA on a mixed fleet: from round 2 each train message carries the previous
    round's stacked update, nodes merge it, and the saved adapter (full-rank export of
    base + merged) reproduces the server's last evaluation."""
    small, large = tmp_path / "small.yaml", tmp_path / "large.yaml"
    small.write_text("name: small\nmemory_mb: 4.6\n")
    large.write_text("name: large\nmemory_mb: 64\n")
    raw = {
        **TINY,
        "partition": {"num_clients": 3, "scheme": "iid"},
        "federation": {"rounds": 3, "min_clients": 2, "aggregator": "flora", "client_eval": True},
        "fleet": {"profiles": [str(small), str(large)], "mix": {"small": 1, "large": 2}},
    }
    tap = tmp_path / "tap.jsonl"
    cfg = config_from_dict(raw)
    simulate(cfg, tmp_path / "run", client_app=tapped_client_app(tap))
    trains = [e for e in _read_jsonl(tap) if e["type"] == "train"]
    for e in trains:
        merges = [r for r in e["in_records"] if r.startswith("merge-")]
        assert merges == ([] if e["round"] == 1 else [f"merge-{e['round'] - 1}"]), e
    rows = _read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(sorted(r["clients"]) == [0, 1, 2] and r["rejected"] == [] for r in rows)
    assert rows[0]["downlink_bytes"] < rows[1]["downlink_bytes"]  # the stack travels down
    _assert_saved_adapter_reproduces(cfg, tmp_path / "run", rows[-1])
