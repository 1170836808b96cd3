"""Wire format: round trips, validation of replies, and byte accounting."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft import traffic, wire

RNG = np.random.default_rng(0)
MOST = 64  # the most examples a reply may claim
SENT = {
    "layer.0.query.lora_A.weight": RNG.normal(size=(4, 32)).astype(np.float32),
    "layer.0.query.lora_B.weight": np.zeros((32, 4), np.float32),
    "classifier.weight": RNG.normal(size=(3, 32)).astype(np.float32),
}


def _reply(update: dict[str, np.ndarray], n: int = 16) -> wire.RecordDict:
    return wire.encode_train_res(wire.TrainRes(update, n, 0.5, 1.0))


def test_train_ins_round_trip() -> None:
    ins = wire.TrainIns(3, '{"seed": 1}', 2, SENT, '{"r": 4}', partition_id=5)
    back = wire.decode_train_ins(wire.encode_train_ins(ins))
    assert (back.server_round, back.config_json, back.num_labels) == (3, '{"seed": 1}', 2)
    assert (back.lora_json, back.partition_id) == ('{"r": 4}', 5)
    assert all(np.array_equal(back.adapters[k], SENT[k]) for k in SENT)


def test_valid_reply_decodes() -> None:
    update = {k: v + 1 for k, v in SENT.items()}
    res = wire.decode_train_res(_reply(update), SENT, MOST)
    assert res.num_examples == 16 and np.array_equal(
        res.update["classifier.weight"], update["classifier.weight"]
    )


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda u: u.pop("classifier.weight"), "keys differ"),
        (
            lambda u: u.update(
                {"bert.embeddings.word_embeddings.weight": np.zeros((5, 32), np.float32)}
            ),
            "keys differ",
        ),
        (
            lambda u: u.update({"classifier.weight": np.zeros((4, 32), np.float32)}),
            "expected float32[3, 32]",
        ),
        (lambda u: u.update({"classifier.weight": np.zeros((3, 32), np.float64)}), "is float64"),
        (lambda u: u["classifier.weight"].__setitem__((0, 0), np.nan), "NaN or Inf"),
        (lambda u: u["classifier.weight"].__setitem__((0, 0), np.inf), "NaN or Inf"),
    ],
)
def test_invalid_replies_are_rejected_with_reason(mutate, fragment: str) -> None:  # type: ignore[no-untyped-def]
    update = {k: v.copy() for k, v in SENT.items()}
    mutate(update)
    with pytest.raises(wire.UpdateRejected) as info:
        wire.decode_train_res(_reply(update), SENT, MOST)
    assert fragment in str(info.value)


def test_client_timings_round_trip() -> None:
    res = wire.TrainRes(SENT, 16, 0.5, 1.25, load_seconds=0.75)
    back = wire.decode_train_res(wire.encode_train_res(res), SENT, MOST)
    assert (back.train_seconds, back.load_seconds) == (1.25, 0.75)
    assert wire.decode_train_res(_reply(SENT), SENT, MOST).load_seconds is None


def test_bad_example_count_is_rejected() -> None:
    with pytest.raises(wire.UpdateRejected, match="positive integer"):
        wire.decode_train_res(_reply(SENT, n=0), SENT, MOST)


def test_record_bytes_is_payload_plus_small_overhead() -> None:
    payload = sum(v.nbytes for v in SENT.values())
    dense = {k: RNG.normal(size=v.shape).astype(np.float32) for k, v in SENT.items()}
    size = traffic.record_bytes(_reply(dense))
    assert payload < size < payload + 2048
    # identical arrays are stored once, as Flower's object store does
    twice = wire.state_to_record(
        {"a": dense["classifier.weight"], "b": dense["classifier.weight"].copy()}
    )
    once = wire.state_to_record({"a": dense["classifier.weight"]})
    rd = wire.RecordDict
    assert traffic.record_bytes(rd({"x": twice})) < 1.5 * traffic.record_bytes(rd({"x": once}))


def test_non_finite_metric_and_bad_eval_reply_are_rejected() -> None:
    reply = wire.encode_train_res(wire.TrainRes(SENT, 16, float("nan"), 1.0))
    with pytest.raises(wire.UpdateRejected, match="finite number"):
        wire.decode_train_res(reply, SENT, MOST)
    with pytest.raises(wire.UpdateRejected, match="lacks"):
        wire.decode_eval_res(wire.RecordDict({}))
    assert wire.decode_eval_res(wire.encode_eval_res(5, {"accuracy": 0.4})) == (
        5,
        {"accuracy": 0.4},
    )


def _hostile_arrays() -> list[tuple[str, object]]:
    """Arrays a client could send whose bytes disagree with what they claim."""
    import io

    import numpy as np
    from flwr.app import Array

    good = Array(np.zeros((4, 8), np.float32))
    huge_header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        huge_header, {"descr": "<f4", "fortran_order": False, "shape": (10**10,)}
    )
    return [
        ("torch stype", Array(dtype="float32", shape=(4, 8), stype="torch.Tensor", data=good.data)),
        ("garbage bytes", Array(dtype="float32", shape=(4, 8), stype="numpy.ndarray", data=b"\x93NUMPYxx")),
        ("huge declared shape", Array(dtype="float32", shape=(4, 8), stype="numpy.ndarray",
                                      data=huge_header.getvalue() + b"\0" * 16)),
        ("short data", Array(dtype="float32", shape=(4, 8), stype="numpy.ndarray", data=good.data[:-8])),
    ]  # fmt: skip


def test_hostile_array_bytes_are_rejected_without_loading_them() -> None:
    import numpy as np
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    expected = {"w": np.zeros((4, 8), np.float32)}
    for name, arr in _hostile_arrays():
        content = RecordDict(
            {
                wire.UPDATE: ArrayRecord({"w": arr}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 4}),
            }
        )
        with pytest.raises(wire.UpdateRejected):
            wire.decode_train_res(content, expected, MOST)
        packed = RecordDict(
            {
                wire.PACKED: ArrayRecord({"stream": arr, "scales": arr}),
                wire.PACKED_HEADER: wire.ConfigRecord({k: [1] for k in wire.PACKED_HEADER_KEYS}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 4}),
            }
        )
        with pytest.raises(wire.UpdateRejected):
            wire.decode_train_res(packed, expected, MOST)
        assert name
