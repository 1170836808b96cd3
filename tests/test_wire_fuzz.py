"""Fuzzing the server at the level an attacker works: real encoded replies and query
answers, mutated (array bytes, npy headers, dtypes, shapes, record kinds and keys, metric
values, compression headers), sent through Flower's own deflate/inflate, then handed to
the server's real accept-and-aggregate path (``AdapterFedAvg.aggregate_train``).

Asserted for every case: nothing raises, nothing malformed is accepted (every accepted
update has the sent keys, shapes and dtype, finite values within the wire's bound and a
weight within the protocol's), and every aggregate the server returns is finite.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    validate_object_content,
)
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import declaration, wire
from fedpeft.compression.compeft import compress
from fedpeft.config import load_config
from fedpeft.models import adapter_state, build_peft_model
from fedpeft.planning import plan_clients
from fedpeft.rounds import ServerRounds
from fedpeft.serverrun import read_declaration
from server.strategy import AdapterFedAvg

ROOT = Path(__file__).resolve().parents[1]
NODES = {101: 0, 102: 1, 103: 2}  # node id -> partition id
HOSTILE = 103
CASES = int(
    os.environ.get("FEDPEFT_FUZZ_CASES", "10500")
)  # reply cases; query and evaluation answers come on top
NUM_LABELS = 4


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Messages carry the run's identity; a simulation sets it, here the test does."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _strategy(aggregator: str, *overrides: str) -> tuple[AdapterFedAvg, list[Message]]:
    """A server of three tiny-BERT clients that has sent round 1's instructions."""
    cfg = load_config(
        str(ROOT / "configs/quickstart.yaml"),
        [
            "model.name=tiny-bert",
            "partition.num_clients=3",
            f"federation.aggregator={aggregator}",
            "lora.r=2",
            "lora.target_modules=[query]",  # few arrays: Flower's cost is per object
            "lora.layers_to_transform=[1]",
            *overrides,
        ],
    )
    fleet = plan_clients(cfg, NUM_LABELS)
    strategy = AdapterFedAvg(cfg, ServerRounds(cfg, NUM_LABELS, dict(NODES), fleet))
    model = build_peft_model(cfg.model, fleet.global_lora, NUM_LABELS, init_seed=0)
    sent = strategy.configure_train(
        1,
        wire.state_to_record(adapter_state(model)),
        ConfigRecord(),
        None,  # type: ignore[arg-type]
    )
    return strategy, list(sent)


def test_instructions_expire_with_the_round(task_identity) -> None:  # type: ignore[no-untyped-def]
    """A node that rejoins after a crash must not train on rounds that have timed out."""
    strategy, sent = _strategy("fedit")
    assert {m.metadata.ttl for m in sent} == {strategy.cfg.federation.timeout}


def through_flower(content: RecordDict) -> RecordDict | None:
    """The content as the other side of Flower's wire gets it: every object deflated,
    checked as the SuperLink checks it, and inflated again. ``None``: Flower itself
    refuses it (never reaches fedpeft)."""
    objects = get_all_nested_objects(content)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    try:
        for body in contents.values():
            validate_object_content(body)
        inflated = inflate_object_from_contents(content.object_id, contents)
    except Exception:  # Flower's refusal, not the server's
        return None
    assert isinstance(inflated, RecordDict)
    return inflated


# --------------------------------------------------------------------------- mutations

EXTREMES = [
    float("nan"), float("inf"), -float("inf"), -1, -0.5, 0, 2**62, -(2**62), 3e38, 1e19,
    -1e300, 1e-45, [1, 2], [0.5], [],
]  # fmt: skip
DESCRS = ["<f8", "|u1", "<i4", ">f4", "<f2", "|b1", "<c8", "V4", "O", "<U1"]
SHAPES = [
    "(-16, -16)", "(", "((1, 2)", "()", "(0,)", "(10**12,)", "(1, 1, 1, 1, 1, 1, 1, 1, 1, 1)",
    "(2.5,)", "('a',)", "None", "{'a': 1}", "(True, 2)", "(-1,)", "[4, 8]", "(4, 8) + (1,)",
]  # fmt: skip


def _npy(descr: str, shape: str, fortran: str, data: bytes) -> bytes:
    """An npy file with a header written by hand, as an attacker would write it."""
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + data


def _valid_npy_body(data: bytes) -> bytes:
    """The data bytes of an npy file (its header stripped; an earlier mutation may have
    broken it, and then the first 128 bytes go)."""
    buf = io.BytesIO(data)
    try:
        np.lib.format.read_magic(buf)
        np.lib.format.read_array_header_1_0(buf)
    except Exception:
        return data[128:]
    return data[buf.tell() :]


def _values(shape: tuple[int, ...], data: bytes) -> np.ndarray:
    """The float32 values an npy file carries, in its declared shape when they fit."""
    body = _valid_npy_body(data)
    values = np.frombuffer(body[: len(body) // 4 * 4], np.float32).copy()
    return values.reshape(shape) if values.size == math.prod(shape) else values


def _mutate_array(arr: Array, rng: random.Random) -> Array:
    data, dtype, shape, stype = bytes(arr.data), arr.dtype, list(arr.shape), arr.stype
    op = rng.randrange(9)
    if op == 0:  # flip bytes, often in the header
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(buf), 128)) if rng.random() < 0.5 else rng.randrange(len(buf))
            buf[i] = rng.randrange(256)
        data = bytes(buf)
    elif op == 1:  # truncate or extend
        data = (
            data[: rng.randrange(len(data))]
            if rng.random() < 0.5
            else data + bytes(rng.randrange(1, 64))
        )
    elif op == 2:  # a hand-written header: odd shapes (the body kept, or sized to fit)
        body = _valid_npy_body(data)
        if rng.random() < 0.3:
            body = body[: rng.choice([0, 4, 16, 1024])].ljust(1024, b"\0")
        data = _npy("<f4", rng.choice(SHAPES), "False", body)
    elif op == 3:  # another dtype in the header, or Fortran order
        body = _valid_npy_body(data)
        fortran = rng.choice(["False", "True", "1", "'x'"])
        data = _npy(rng.choice(DESCRS), str(tuple(arr.shape)), fortran, body)
    elif op == 4:  # the Array's own metadata lies
        dtype = rng.choice(["float64", "uint8", "int32", "float16", "", "float32"])
        shape = rng.choice([[], [0], [-1], [2**31 - 1], [*shape, 1], shape[::-1]])
        stype = rng.choice(["numpy.ndarray", "torch.Tensor", "", "pickle"])
    elif op == 5:  # valid npy, one hostile value
        values = _values(arr.shape, data)
        if not values.size:
            return Array(np.asarray([rng.choice([3e38, np.nan, 1e19])], np.float32))
        values.flat[rng.randrange(values.size)] = rng.choice(
            [3e38, -3e38, 1e19, 1e6 * 1.01, np.nan, np.inf, 1e-45]
        )
        return Array(values)
    elif op == 6:  # valid npy, scaled by a large factor
        factor = np.float32(rng.choice([1e3, 1e8, 1e30]))
        return Array((_values(arr.shape, data) * factor).astype(np.float32))
    elif op == 7:  # another valid array altogether
        return Array(rng.choice([np.zeros((2, 2), np.float32), np.zeros(5, np.uint8),
                                 np.ones((2, 3, 4), np.float32), np.zeros((0,), np.float32),
                                 np.zeros((64, 64), np.float64)]))  # fmt: skip
    else:  # garbage
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)


def _mutate_values(
    record: ConfigRecord | MetricRecord, rng: random.Random
) -> ConfigRecord | MetricRecord:
    values = dict(record)
    op = rng.randrange(4)
    keys = list(values)
    if op == 0 and keys:
        values.pop(rng.choice(keys))
    elif op == 1 and keys:
        values[rng.choice(keys) + rng.choice(["x", "-", " "])] = values.pop(rng.choice(keys))
    elif op == 2:
        values[rng.choice([*keys, "extra"])] = rng.choice(EXTREMES)
    elif keys:
        key = rng.choice(keys)
        old = values[key]
        if isinstance(old, list) and old:  # a compression header list
            choice = rng.randrange(4)
            if choice == 0:
                old = [*old, rng.choice([0, 1, -1, 2**62])]
            elif choice == 1:
                old = old[:-1]
            else:
                old = list(old)
                old[rng.randrange(len(old))] = rng.choice([0, -1, 1, 7, 2**31, 2**62, -(2**62)])
            values[key] = old
        else:
            values[key] = rng.choice(EXTREMES)
    try:
        return type(record)(values)  # type: ignore[arg-type]
    except Exception:  # a value that record kind cannot hold
        return ConfigRecord({k: str(v) for k, v in values.items()})


def mutate(content: RecordDict, rng: random.Random) -> RecordDict:
    """One to three random mutations of a reply or answer."""
    records: dict[str, Any] = dict(content.items())
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(list(records)) if records else "x"
        record = records.get(name)
        op = rng.randrange(10)
        if op == 0:  # drop a record
            records.pop(name, None)
        elif op == 1:  # rename it
            if name in records:
                records[
                    rng.choice([name + "_", wire.UPDATE, wire.PACKED, wire.METRICS, "fedpeft"])
                ] = records.pop(name)
        elif op == 2:  # another kind under the same name
            records[name] = rng.choice([
                ConfigRecord({"a": 1}), MetricRecord({wire.NUM_EXAMPLES: 4}),
                ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
            ])  # fmt: skip
        elif op == 3:  # an extra record
            records[rng.choice(["extra", wire.PACKED, wire.UPDATE, wire.PACKED_HEADER])] = (
                ConfigRecord({"k": 1})
            )
        elif isinstance(record, ArrayRecord) and len(record):
            arrays = dict(record.items())
            key = rng.choice(list(arrays))
            if op == 4:
                arrays.pop(key)
            elif op == 5:
                arrays[key + "x"] = arrays.pop(key)
            else:
                arrays[key] = _mutate_array(arrays[key], rng)
            records[name] = ArrayRecord(arrays)
        elif isinstance(record, ConfigRecord | MetricRecord):
            records[name] = _mutate_values(record, rng)
    return RecordDict(records)


# --------------------------------------------------------------------------- oracles


def _assert_well_formed(res: wire.TrainRes, sent: wire.State, most: int) -> None:
    assert sorted(res.update) == sorted(sent)
    for key, value in res.update.items():
        assert value.dtype == np.float32 and value.shape == sent[key].shape
        assert np.isfinite(value).all() and np.abs(value).max(initial=0) <= wire.MAX_UPDATE_VALUE
    assert isinstance(res.num_examples, int) and 1 <= res.num_examples <= most
    for metric in (res.train_loss, res.train_seconds, res.epsilon, res.load_seconds):
        assert metric is None or (np.isfinite(metric) and metric >= 0)


def _valid_replies(
    strategy: AdapterFedAvg, sent: list[Message], seed: int
) -> dict[int, RecordDict]:
    """One real reply per node: fp32, or compressed with the codec (the hostile node's
    base alternates between the two)."""
    rng = np.random.default_rng(seed)
    replies = {}
    for msg in sent:
        node = msg.metadata.dst_node_id
        adapters = strategy.rounds.sent[node]
        update = {k: rng.normal(0, 1e-2, v.shape).astype(np.float32) for k, v in adapters.items()}
        res = wire.TrainRes(update, 16, 0.7, 1.5, load_seconds=0.2, startup_seconds=0.0)
        if seed % 2:
            compressed, _ = compress(update, {}, 0.2)
            res = wire.TrainRes(wire.codec.dense(compressed), 16, 0.7, 1.5, compressed=compressed)
        replies[node] = wire.encode_train_res(res)
    return replies


@pytest.mark.slow
def test_mutated_replies_never_crash_the_server_nor_reach_the_aggregate(task_identity) -> None:  # type: ignore[no-untyped-def]
    logging.getLogger("fedpeft").setLevel(logging.ERROR)  # 10,000 rejections, each logged
    rng = random.Random(0)
    servers = {name: _strategy(name) for name in ("fedit", "flexlora", "trimmed_mean", "median")}
    bases = {
        (name, seed): _valid_replies(*servers[name], seed) for name in servers for seed in (0, 1)
    }
    accepted = refused_by_flower = 0
    try:
        for case in range(CASES):
            name = ("fedit", "flexlora", "trimmed_mean", "median")[case % 4]
            strategy, sent = servers[name]
            replies = bases[(name, case % 2)]
            hostile = through_flower(mutate(replies[HOSTILE], rng))
            if hostile is None:
                refused_by_flower += 1
                continue
            # the hostile reply alone (the honest replies' part is fixed, so re-running
            # it every case would only cost time; test_a_non_finite_aggregate_... mixes them)
            to_hostile = next(m for m in sent if m.metadata.dst_node_id == HOSTILE)
            round_replies = [Message(hostile, reply_to=to_hostile)]
            rejected = strategy.rounds.stats[1].rejected
            before = len(rejected)
            arrays, _ = strategy.aggregate_train(1, round_replies)
            refused = any(r["node"] == HOSTILE for r in rejected[before:])
            assert (arrays is None) == refused
            if arrays is not None:  # the hostile reply got in: it must be sound
                assert all(np.isfinite(a.numpy()).all() for a in arrays.values())
                accepted += 1
                most = strategy.cfg.train.local_steps * strategy.cfg.train.batch_size
                res = wire.decode_train_res(hostile, strategy.rounds.sent[HOSTILE], most)
                _assert_well_formed(res, strategy.rounds.sent[HOSTILE], most)
    finally:
        logging.getLogger("fedpeft").setLevel(logging.INFO)
    # the mix really probes both sides: most mutations are rejected, some are benign
    assert refused_by_flower < CASES // 20  # nearly every case reaches fedpeft's decoder
    assert 0 < accepted < (CASES - refused_by_flower) // 2


@pytest.mark.parametrize(
    "make",
    [
        # numpy's header parser raises tokenize.TokenError here (it crashed the server)
        lambda: Array(
            dtype="float32",
            shape=(4, 8),
            stype="numpy.ndarray",
            data=_npy("<f4", "(", "False", bytes(128)),
        ),
        # (-16, -16): 1,024 bytes fit the product of the dimensions (it crashed at reshape)
        lambda: Array(
            dtype="float32",
            shape=(4, 8),
            stype="numpy.ndarray",
            data=_npy("<f4", "(-16, -16)", "False", bytes(1024)),
        ),
    ],
)
def test_npy_headers_that_crashed_the_decoder_are_rejected(make: Callable[[], Array]) -> None:
    content = RecordDict({
        wire.UPDATE: ArrayRecord({"w": make()}),
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 4}),
    })  # fmt: skip
    with pytest.raises(wire.UpdateRejected):
        wire.decode_train_res(content, {"w": np.zeros((4, 8), np.float32)}, 16)


@pytest.mark.parametrize(
    ("metrics", "update", "fragment"),
    [
        ({wire.NUM_EXAMPLES: 2**62}, None, "more than 16"),
        ({wire.NUM_EXAMPLES: 4, "epsilon": -1.0}, None, "outside"),
        ({wire.NUM_EXAMPLES: 4, "train-seconds": -3.0}, None, "outside"),
        ({wire.NUM_EXAMPLES: 4, "train-loss": -0.1}, None, "outside"),
        ({wire.NUM_EXAMPLES: 4}, 3e38, "magnitude"),
        ({wire.NUM_EXAMPLES: 4}, 1e19, "magnitude"),
    ],
)
def test_values_no_honest_client_sends_are_refused_at_the_boundary(
    metrics: dict[str, Any], update: float | None, fragment: str
) -> None:
    values = np.zeros((4, 8), np.float32)
    if update is not None:
        values[0, 0] = update
    content = RecordDict(
        {wire.UPDATE: wire.state_to_record({"w": values}), wire.METRICS: MetricRecord(metrics)}
    )
    with pytest.raises(wire.UpdateRejected, match=fragment):
        wire.decode_train_res(content, {"w": values}, 16)


def test_a_bitstream_given_as_a_2d_array_is_refused() -> None:
    update = {"w": np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)}
    sent, _ = compress(update, {}, 0.25)
    reply = wire.encode_train_res(
        wire.TrainRes(wire.codec.dense(sent), 4, 0.1, 0.1, compressed=sent)
    )
    stream = reply.array_records[wire.PACKED]["stream"].numpy()
    reply.array_records[wire.PACKED]["stream"] = Array(stream.reshape(1, -1))
    with pytest.raises(wire.UpdateRejected, match="1-D"):
        wire.decode_train_res(reply, {"w": update["w"]}, 16)


@pytest.mark.parametrize("aggregator", ["flexlora", "trimmed_mean"])
def test_a_non_finite_aggregate_is_never_installed(aggregator: str, task_identity) -> None:  # type: ignore[no-untyped-def]
    """Updates within the wire's bound, a server step far beyond any sane one: the
    aggregate overflows float32, and the server keeps the adapters it had."""
    strategy, sent = _strategy(aggregator, "federation.server_lr=1e36")
    replies = _valid_replies(strategy, sent, 0)
    big = {k: np.full(v.shape, 9e5, np.float32) for k, v in strategy.rounds.sent[HOSTILE].items()}
    replies[HOSTILE] = wire.encode_train_res(wire.TrainRes(big, 16, 0.5, 1.0))
    msgs = {m.metadata.dst_node_id: m for m in sent}
    arrays, _ = strategy.aggregate_train(1, [Message(replies[n], reply_to=msgs[n]) for n in NODES])
    assert arrays is None
    assert strategy.rounds.stats[1].rejected[-1]["reason"] == "non-finite aggregate"


def test_mutated_query_and_evaluation_answers_never_crash_the_server(task_identity) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1)
    strategy, sent = _strategy("fedit")
    answer = declaration.encode_profile(
        {"partition-id": 1, "memory-mb": 512, "device": "pi", "speed": 0.5}
    )
    evaluation = wire.encode_eval_res(20, {"accuracy": 0.5, "loss": 0.7})
    msgs = {m.metadata.dst_node_id: m for m in sent}
    for _ in range(2000):
        got = through_flower(mutate(answer, rng))
        if got is not None:
            declared = read_declaration(5, got)
            assert declared is None or (isinstance(declared[0], int) and (
                declared[1] is None or (declared[1].memory_mb > 0 and np.isfinite(declared[1].memory_mb))
            ))  # fmt: skip
        hostile = through_flower(mutate(evaluation, rng))
        if hostile is not None:
            honest = [Message(evaluation, reply_to=msgs[n]) for n in (101, 102)]
            result = strategy.aggregate_evaluate(
                1, [*honest, Message(hostile, reply_to=msgs[HOSTILE])]
            )
            assert result is not None and all(np.isfinite(v) for v in dict(result).values())
