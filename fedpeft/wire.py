"""Updates <-> Flower records. The only module that knows message keys.

A train instruction carries the global adapters (ArrayRecord) and a ConfigRecord with the
round, the resolved run config (JSON) and the number of labels. A train reply carries the
client's update Δ = adapters_after − adapters_received (ArrayRecord) and a MetricRecord.
With compression, the update (and, with ``compression.downlink``, the adapters sent) is
one uint8 bitstream and float32 scales (ArrayRecord) with an integer header
(ConfigRecord); see :mod:`fedpeft.compression.codec`. Only plain numeric arrays travel:
never a pickle, never a base-model weight. Arrays from clients are read without trusting
their own headers (:func:`untrusted_array`).
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.compression import codec
from fedpeft.compression.compeft import Ternary
from fedpeft.compression.rice import CodecError
from fedpeft.types import State as State  # re-exported

ADAPTERS = "adapters"
UPDATE = "update"
CONFIG = "fedpeft"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"  # the key Flower's own strategies weight by
TRAIN_LOSS = "train-loss"  # the metric the strategy hands back to Flower's round loop
MERGE_PREFIX = "merge-"  # + round: one stacked product update to merge into the base (FLoRA)
# A compressed update (ComPEFT): the bitstream and scales, and its integer header
PACKED = "update-compeft"
PACKED_HEADER = "compeft"
PACKED_HEADER_KEYS = ("shapes", "ndims", "kept", "rice", "nbytes")
STRUCTURE = "structure"  # the adapter's fixed part (LoRA-SB's B, A; a sparse mask), sent once
BURNIN = "burnin"  # the action of the burn-in message ("train.burnin"), before round 1
PLACEMENT = "placement"  # a reply's Ray node and host (simulations on a Ray cluster)

T = TypeVar("T")

# The largest |entry| an update may hold. No training step moves a LoRA factor or a head
# weight by 1e6; at this bound a product of two factors, summed over any fleet and
# scaled by a server step, stays far inside float32 (max 3.4e38), so aggregation cannot
# overflow to inf on values a client was allowed to send.
MAX_UPDATE_VALUE = 1e6
MAX_NDIM = 8  # adapters are matrices (and a bias vector); a deeper array is malformed
# Evaluation replies: a client's held-out count and metric values (accuracy, loss,
# perplexity), bounded so that their weighted sums stay finite in float64.
MAX_EVAL_EXAMPLES = 2**31
MAX_METRIC_VALUE = 1e12


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
    # round -> stacked (B_s, A_s) per module this node has not merged yet (FLoRA only)
    merges: dict[int, State] = field(default_factory=dict)
    # Downlink compression: the adapters as a compressed change against the node's view
    # number ``base_view`` (``adapters`` is then empty); the result becomes view ``view``.
    downlink: codec.Packed | None = None
    base_view: int = -1
    view: int = 0
    # the digest of the fixed structure the adapters are in (LoRA-SB's basis, a sparse
    # mask), and the structure itself when the server has not sent it to this node yet
    # (a node keeps it)
    structure_digest: str = ""
    structure: State | None = None


@dataclass(frozen=True)
class TrainRes:
    """A client's reply. With ``compressed`` set, the wire carries it (ComPEFT) and
    ``update`` is its dense form, exactly what the server decodes."""

    update: State
    num_examples: int
    train_loss: float | None  # None: not reported (DP modes)
    train_seconds: float | None
    compressed: dict[str, Ternary] | None = None
    epsilon: float | None = None  # record-level or local DP: this node's ε so far
    load_seconds: float | None = None  # time to have the model and the data ready
    startup_seconds: float | None = None  # process start to its first round; 0: reused
    placement: tuple[str, str] | None = None  # (Ray node, host) that ran it, when it says


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
            "base-view": ins.base_view,
            "view": ins.view,
            **({"structure-digest": ins.structure_digest} if ins.structure_digest else {}),
        }
    )
    content = RecordDict({CONFIG: config})
    if ins.structure is not None:
        content[STRUCTURE] = state_to_record(ins.structure)
    if ins.downlink is None:
        content[ADAPTERS] = state_to_record(ins.adapters)
    else:
        content[PACKED], content[PACKED_HEADER] = _packed_records(ins.downlink)
    for server_round, stack in ins.merges.items():
        content[f"{MERGE_PREFIX}{server_round}"] = state_to_record(stack)
    return content


def decode_train_ins(content: RecordDict) -> TrainIns:
    config = content.config_records[CONFIG]
    full = ADAPTERS in content.array_records
    return TrainIns(
        server_round=int(config["server-round"]),  # type: ignore[arg-type]
        config_json=str(config["config-json"]),
        num_labels=int(config["num-labels"]),  # type: ignore[arg-type]
        adapters=record_to_state(content.array_records[ADAPTERS]) if full else {},
        lora_json=str(config["lora-json"]),
        partition_id=int(config["partition-id"]),  # type: ignore[arg-type]
        merges={
            int(name.removeprefix(MERGE_PREFIX)): record_to_state(record)
            for name, record in content.array_records.items()
            if name.startswith(MERGE_PREFIX)
        },
        downlink=None if full else _packed_from(content),
        base_view=int(config.get("base-view", -1)),  # type: ignore[arg-type]
        view=int(config.get("view", 0)),  # type: ignore[arg-type]
        structure_digest=str(config.get("structure-digest", "")),
        structure=record_to_state(content.array_records[STRUCTURE])
        if STRUCTURE in content.array_records
        else None,
    )


def encode_train_res(res: TrainRes) -> RecordDict:
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: res.num_examples,
            **({} if res.train_loss is None else {"train-loss": res.train_loss}),
            **({} if res.train_seconds is None else {"train-seconds": res.train_seconds}),
            **({} if res.load_seconds is None else {"load-seconds": res.load_seconds}),
            **({} if res.startup_seconds is None else {"startup-seconds": res.startup_seconds}),
            **({} if res.epsilon is None else {"epsilon": res.epsilon}),
        }
    )
    if res.compressed is None:
        return RecordDict({UPDATE: state_to_record(res.update), METRICS: metrics})
    arrays, header = _packed_records(codec.pack(res.compressed))
    return RecordDict({PACKED: arrays, PACKED_HEADER: header, METRICS: metrics})


def _packed_records(packed: codec.Packed) -> tuple[ArrayRecord, ConfigRecord]:
    arrays = ArrayRecord(
        OrderedDict((("stream", Array(packed.stream)), ("scales", Array(packed.scales))))
    )
    return arrays, ConfigRecord({k: getattr(packed, k) for k in PACKED_HEADER_KEYS})


def decode_train_res(content: RecordDict, expected: State, max_examples: int) -> TrainRes:
    """Decode and validate a reply (fp32 or compressed) against the adapters sent; a
    client may claim at most ``max_examples`` (its weight in the mean). Every defect, in
    any field, is an :class:`UpdateRejected` with the reason: whatever a client sends,
    the server's round goes on."""
    return untrusted(_decode_train_res, content, expected, max_examples)


def untrusted(decode: Callable[..., T], *args: Any) -> T:
    """Run a decoder of client bytes; an exception it did not foresee (the parsers it
    calls raise more kinds than they document) is a rejection, never a server crash."""
    try:
        return decode(*args)
    except UpdateRejected:
        raise
    except Exception as err:  # the input is hostile; any failure rejects it
        raise UpdateRejected(f"malformed reply ({type(err).__name__}: {err})"[:300]) from None


def _decode_train_res(content: RecordDict, expected: State, max_examples: int) -> TrainRes:
    if METRICS not in content.metric_records:
        raise UpdateRejected(f"reply lacks the '{METRICS}' record")
    metrics = content.metric_records[METRICS]
    num_examples = metrics.get(NUM_EXAMPLES)
    if not isinstance(num_examples, int) or num_examples < 1:
        raise UpdateRejected(f"'{NUM_EXAMPLES}' should be a positive integer, got {num_examples!r}")
    if num_examples > max_examples:  # the protocol bounds the weight a client may claim
        raise UpdateRejected(f"claims {num_examples} examples, more than {max_examples}")
    compressed = None
    if UPDATE in content.array_records:
        update = _validated_update(content.array_records[UPDATE], expected)
    elif PACKED in content.array_records and PACKED_HEADER in content.config_records:
        compressed = _unpacked(content, expected)
        update = codec.dense(compressed)
        for key, value in update.items():
            _check_magnitude(key, value)
    else:
        raise UpdateRejected(f"reply lacks the '{UPDATE}' or '{PACKED}' arrays")
    return TrainRes(
        update=update,
        num_examples=num_examples,
        train_loss=_optional(metrics, "train-loss"),
        train_seconds=_optional(metrics, "train-seconds"),
        compressed=compressed,
        epsilon=_optional(metrics, "epsilon"),
        load_seconds=_optional(metrics, "load-seconds"),
        startup_seconds=_optional(metrics, "startup-seconds"),
        placement=read_placement(content),
    )


def _unpacked(content: RecordDict, expected: State) -> dict[str, Ternary]:
    """A compressed update's tensors; any malformed part is an :class:`UpdateRejected`."""
    packed = _packed_from(content)
    try:
        return codec.unpack(packed, {k: v.shape for k, v in expected.items()})
    except CodecError as err:
        raise UpdateRejected(f"compressed update: {err}") from None


def _packed_from(content: RecordDict) -> codec.Packed:
    """The compressed payload of a message, its records checked for type (not content)."""
    if PACKED not in content.array_records or PACKED_HEADER not in content.config_records:
        raise UpdateRejected(f"the message lacks the '{PACKED}' payload or its header")
    arrays, header = content.array_records[PACKED], content.config_records[PACKED_HEADER]
    if sorted(arrays) != ["scales", "stream"]:
        raise UpdateRejected(f"'{PACKED}' should hold 'stream' and 'scales', got {sorted(arrays)}")
    ints: dict[str, list[int]] = {}
    for key in PACKED_HEADER_KEYS:
        value = header.get(key)
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise UpdateRejected(f"compression header '{key}' should be a list of integers")
        ints[key] = [int(v) for v in value]
    stream, scales = arrays["stream"], arrays["scales"]
    if stream.dtype != "uint8" or scales.dtype != "float32":
        raise UpdateRejected(
            f"stream/scales should be uint8/float32, got {stream.dtype}/{scales.dtype}"
        )
    if len(stream.shape) != 1 or len(scales.shape) != 1:
        raise UpdateRejected(
            f"stream/scales should be 1-D, got {list(stream.shape)}/{list(scales.shape)}"
        )
    return codec.Packed(
        stream=untrusted_array(stream, "uint8", "stream").ravel(),
        scales=untrusted_array(scales, "float32", "scales").ravel(),
        **ints,
    )


def untrusted_array(arr: Array, dtype: str, what: str) -> np.ndarray:
    """An array from a client, read without trusting it: Flower's ``Array.numpy`` calls
    ``np.load``, which allocates whatever shape the payload's own header declares. Here
    the header is parsed first, and the data must be exactly the bytes that shape needs,
    so memory never exceeds what actually arrived. Any defect is an UpdateRejected."""
    if arr.stype != "numpy.ndarray":
        raise UpdateRejected(f"'{what}' has serialization {arr.stype!r}, expected numpy.ndarray")
    buf = io.BytesIO(arr.data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, found = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, found = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"npy format {version}")
    except Exception as err:  # numpy's header parser raises many kinds
        raise UpdateRejected(f"'{what}' is not a readable array ({err})"[:300]) from None
    if found != np.dtype(dtype) or fortran:
        raise UpdateRejected(f"'{what}' holds {found}, expected {dtype}")
    # numpy parses the shape with ast.literal_eval: (-16, -16) is a valid tuple whose
    # product is positive, so every dimension is checked, not just the byte count
    if len(shape) > MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
        raise UpdateRejected(f"'{what}' declares the shape {shape!r}")
    data = arr.data[buf.tell() :]
    if len(data) != math.prod(shape) * found.itemsize:
        raise UpdateRejected(f"'{what}' declares {list(shape)} but carries {len(data)} bytes")
    return np.frombuffer(data, dtype=found).reshape(shape).copy()  # writable, and ours


def _check_magnitude(what: str, value: np.ndarray) -> None:
    if value.size and (peak := float(np.abs(value).max())) > MAX_UPDATE_VALUE:
        raise UpdateRejected(
            f"'{what}' holds a value of magnitude {peak:.3g}, beyond {MAX_UPDATE_VALUE:g}"
        )


def _optional(metrics: MetricRecord, key: str) -> float | None:
    """A reported loss, ε or timing: each is non-negative by definition."""
    return None if key not in metrics else _scalar(metrics[key], key, 0.0, math.inf)


def _scalar(value: object, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UpdateRejected(f"metric '{key}' is {value!r}, expected a finite number")
    if not low <= value <= high:
        raise UpdateRejected(f"metric '{key}' is {value!r}, outside [{low:g}, {high:g}]")
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
        value = untrusted_array(arr, "float32", key)
        if value.shape != expected[key].shape:
            raise UpdateRejected(
                f"'{key}' carries {list(value.shape)}, expected {list(expected[key].shape)}"
            )
        if not np.isfinite(value).all():
            raise UpdateRejected(f"'{key}' holds NaN or Inf")
        _check_magnitude(key, value)
        update[key] = value
    return update


def encode_eval_res(num_examples: int, metrics: dict[str, float]) -> RecordDict:
    return RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: num_examples, **metrics})})


def decode_eval_res(content: RecordDict) -> tuple[int, dict[str, float]]:
    """A client's held-out example count and metrics; any defect is UpdateRejected."""
    return untrusted(_decode_eval_res, content)


def _decode_eval_res(content: RecordDict) -> tuple[int, dict[str, float]]:
    if METRICS not in content.metric_records:
        raise UpdateRejected(f"evaluation reply lacks the '{METRICS}' record")
    record = content.metric_records[METRICS]
    n = record.get(NUM_EXAMPLES)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_EVAL_EXAMPLES:
        raise UpdateRejected(f"'{NUM_EXAMPLES}' should be an integer in [0, 2^31], got {n!r}")
    bound = MAX_METRIC_VALUE
    return n, {k: _scalar(v, k, -bound, bound) for k, v in record.items() if k != NUM_EXAMPLES}


def write_placement(content: RecordDict, ray_node: str, host: str) -> None:
    content[PLACEMENT] = ConfigRecord({"ray-node": ray_node, "host": host})


def read_placement(content: RecordDict) -> tuple[str, str] | None:
    """(Ray node id, host) of the process that produced a reply, when it says."""
    record = content.config_records.get(PLACEMENT)
    if record is None:
        return None
    return str(record.get("ray-node", "?")), str(record.get("host", "?"))
