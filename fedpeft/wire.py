"""Updates <-> Flower records. The only module that knows message keys.

A train instruction carries the global adapters (ArrayRecord) and a ConfigRecord with the
round, the resolved run config (JSON) and the number of labels. A train reply carries the
client's update Δ = adapters_after − adapters_received (ArrayRecord) and a MetricRecord.
Only plain numeric arrays travel: never a pickle, never a base-model weight.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

ADAPTERS = "adapters"
UPDATE = "update"
CONFIG = "fedpeft"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"  # the key Flower's own strategies weight by

State = dict[str, np.ndarray]


class UpdateRejected(ValueError):
    """A client reply that fails validation; the message says why."""


@dataclass(frozen=True)
class TrainIns:
    server_round: int
    config_json: str
    num_labels: int
    adapters: State
    lora_json: str  # this client's LoRA section (its planned layers and ranks)
    partition_id: int  # the partition the server assigned to this node


@dataclass(frozen=True)
class TrainRes:
    update: State
    num_examples: int
    train_loss: float
    train_seconds: float


def state_to_record(state: State) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in state.items()))


def record_to_state(record: ArrayRecord) -> State:
    return {k: arr.numpy() for k, arr in record.items()}


def encode_train_ins(ins: TrainIns) -> RecordDict:
    config = ConfigRecord(
        {
            "server-round": ins.server_round,
            "config-json": ins.config_json,
            "num-labels": ins.num_labels,
            "lora-json": ins.lora_json,
            "partition-id": ins.partition_id,
        }
    )
    return RecordDict({ADAPTERS: state_to_record(ins.adapters), CONFIG: config})


def decode_train_ins(content: RecordDict) -> TrainIns:
    config = content.config_records[CONFIG]
    return TrainIns(
        server_round=int(config["server-round"]),  # type: ignore[arg-type]
        config_json=str(config["config-json"]),
        num_labels=int(config["num-labels"]),  # type: ignore[arg-type]
        adapters=record_to_state(content.array_records[ADAPTERS]),
        lora_json=str(config["lora-json"]),
        partition_id=int(config["partition-id"]),  # type: ignore[arg-type]
    )


def encode_train_res(res: TrainRes) -> RecordDict:
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: res.num_examples,
            "train-loss": res.train_loss,
            "train-seconds": res.train_seconds,
        }
    )
    return RecordDict({UPDATE: state_to_record(res.update), METRICS: metrics})


def decode_train_res(content: RecordDict, expected: State) -> TrainRes:
    """Decode and validate a reply against the adapters the client was sent."""
    if UPDATE not in content.array_records or METRICS not in content.metric_records:
        raise UpdateRejected(f"reply lacks the '{UPDATE}' arrays or the '{METRICS}' record")
    metrics = content.metric_records[METRICS]
    num_examples = metrics.get(NUM_EXAMPLES)
    if not isinstance(num_examples, int) or num_examples < 1:
        raise UpdateRejected(f"'{NUM_EXAMPLES}' should be a positive integer, got {num_examples!r}")
    update = _validated_update(content.array_records[UPDATE], expected)
    return TrainRes(
        update=update,
        num_examples=num_examples,
        train_loss=_scalar(metrics.get("train-loss")),
        train_seconds=_scalar(metrics.get("train-seconds", 0.0)),
    )


def _scalar(value: object) -> float:
    if not isinstance(value, int | float) or not np.isfinite(value):
        raise UpdateRejected(f"metric value {value!r} should be a finite number")
    return float(value)


def _validated_update(record: ArrayRecord, expected: State) -> State:
    missing = sorted(set(expected) - set(record))
    unknown = sorted(set(record) - set(expected))
    if missing or unknown:
        raise UpdateRejected(
            f"keys differ from the adapters sent (missing {missing[:2]}, unknown {unknown[:2]})"
        )
    update = {}
    for key, arr in record.items():
        if arr.dtype != "float32" or tuple(arr.shape) != expected[key].shape:
            raise UpdateRejected(
                f"'{key}' is {arr.dtype}{list(arr.shape)}, expected float32{list(expected[key].shape)}"
            )
        value = arr.numpy()
        if not np.isfinite(value).all():
            raise UpdateRejected(f"'{key}' holds NaN or Inf")
        update[key] = value
    return update


def encode_eval_res(num_examples: int, metrics: dict[str, float]) -> RecordDict:
    return RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: num_examples, **metrics})})


def decode_eval_res(content: RecordDict) -> tuple[int, dict[str, float]]:
    if METRICS not in content.metric_records:
        raise UpdateRejected(f"evaluation reply lacks the '{METRICS}' record")
    record = content.metric_records[METRICS]
    n = record.get(NUM_EXAMPLES)
    if not isinstance(n, int) or n < 0:
        raise UpdateRejected(f"'{NUM_EXAMPLES}' should be a non-negative integer, got {n!r}")
    return n, {k: _scalar(v) for k, v in record.items() if k != NUM_EXAMPLES}


def encode_profile(node_config: dict[str, object]) -> RecordDict:
    """A node's answer to the server's query: its node config (partition, profile)."""
    values = {str(k): v for k, v in node_config.items() if isinstance(v, int | float | str | bool)}
    return RecordDict({CONFIG: ConfigRecord(values)})  # type: ignore[arg-type]


def decode_profile(content: RecordDict) -> dict[str, object]:
    return dict(content.config_records[CONFIG])


def record_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower ships it: every object of its tree
    (records, arrays, array chunks), each counted once, as the object store does."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
