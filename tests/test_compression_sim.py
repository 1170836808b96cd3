"""Compressed updates end to end in a federation (in process), with a tiny model.

A client mod sits between the ClientApp and the wire: it records the node's
error-feedback residual before and after each train message and what the reply decodes
to, and for one partition it corrupts the bitstream, as a faulty or hostile client would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.app import make_client_app
from fedpeft import nodestate, traffic, wire
from fedpeft.cli import simulate
from fedpeft.config import config_from_dict
from tests.test_simulation import TINY

pytestmark = pytest.mark.slow
# the tests of the module's one simulation (the ``run`` fixture) share a pytest-xdist
# worker, so that it runs once, not once per worker
SHARES_THE_RUN = pytest.mark.xdist_group("compression-run")

COMPRESSED = {
    **TINY,
    "partition": {"num_clients": 3, "scheme": "iid"},
    "federation": {"rounds": 3, "min_clients": 2},
    "compression": {"density": 0.1, "error_feedback": True},
}


def _lists(state: wire.State) -> dict[str, list[float]]:
    return {k: v.ravel().tolist() for k, v in state.items()}


def corrupting_client_app(log_path: Path, bad_partition: int) -> ClientApp:
    """Logs to a file: the ClientApp runs in Ray actor processes."""

    def tap(msg: Message, context: Context, call_next: Any) -> Message:
        if msg.metadata.message_type != "train":
            return call_next(msg, context)
        ins = wire.decode_train_ins(msg.content)
        before = nodestate.read_residual(context.state)
        reply = call_next(msg, context)
        after = nodestate.read_residual(context.state)
        sent = wire.decode_train_res(reply.content, ins.adapters, 2**31).update
        entry = {
            "round": ins.server_round, "partition": ins.partition_id, "before": _lists(before),
            "after": _lists(after), "sent": _lists(sent),
            "records": sorted(reply.content.array_records),
            "bytes": traffic.record_bytes(reply.content),
        }  # fmt: skip
        with log_path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        if ins.partition_id == bad_partition and ins.server_round == 2:
            stream = reply.content.array_records[wire.PACKED]["stream"].numpy()
            scales = reply.content.array_records[wire.PACKED]["scales"].numpy()
            bad = RecordDict(dict(reply.content.items()))
            bad[wire.PACKED] = ArrayRecord({"stream": Array(stream[:-4]), "scales": Array(scales)})
            return Message(bad, reply_to=msg)
        return reply

    return make_client_app(mods=[tap])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("compressed")
    log_path = out / "tap.jsonl"
    simulate(
        config_from_dict(COMPRESSED), out / "run", client_app=corrupting_client_app(log_path, 0)
    )
    log = [json.loads(x) for x in log_path.read_text().splitlines()]
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "run" / "summary.json").read_text())
    return {"log": log, "rows": rows, "summary": summary}


@SHARES_THE_RUN
def test_only_the_compressed_payload_crosses_the_wire(run: dict[str, Any]) -> None:
    assert {tuple(e["records"]) for e in run["log"]} == {(wire.PACKED,)}
    for e in run["log"]:  # ternary: one magnitude per tensor, ~10% of the entries kept
        for values in e["sent"].values():
            value = np.asarray(values)
            kept = value[value != 0]
            assert len(np.unique(np.abs(kept))) <= 1
            assert kept.size <= max(1, int(np.ceil(0.1 * value.size)))


@SHARES_THE_RUN
def test_error_feedback_residual_survives_between_rounds(run: dict[str, Any]) -> None:
    by_round = {(e["partition"], e["round"]): e for e in run["log"]}
    for partition in (1, 2):
        assert by_round[(partition, 1)]["before"] == {}
        for r in (2, 3):  # what round r-1 kept is what round r starts from
            kept = by_round[(partition, r - 1)]["after"]
            assert kept == by_round[(partition, r)]["before"]
            assert any(np.abs(v).sum() > 0 for v in kept.values())


@SHARES_THE_RUN
def test_a_corrupted_update_is_rejected_and_the_round_goes_on(run: dict[str, Any]) -> None:
    rows = run["rows"]
    assert [r["rejected"] for r in (rows[0], rows[2])] == [[], []]
    (rejected,) = rows[1]["rejected"]
    assert rejected["client"] == 0 and "compressed update" in rejected["reason"]
    assert sorted(rows[1]["clients"]) == [1, 2]


@SHARES_THE_RUN
def test_byte_accounting_against_fp32_and_the_bound(run: dict[str, Any]) -> None:
    rows, comp = run["rows"], run["summary"]["compression"]
    sent = {(e["round"], e["partition"]): e["bytes"] for e in run["log"]}
    assert rows[0]["uplink_bytes"] == sum(b for (r, _), b in sent.items() if r == 1)
    assert comp["uplink_ratio_vs_fp32"] > 4  # tiny tensors: framing weighs more than at scale
    assert 1.0 <= comp["payload_over_bound"] < 1.25
    assert 1 < comp["bits_per_kept_value"] < 32
    assert comp["kept_values_total"] == sum(r["uplink_kept_values"] for r in rows)
    assert comp["downlink_ratio_vs_fp32"] == 1.0  # downlink compression is off here


def forgetful_client_app(log_path: Path, forget: tuple[int, int]) -> ClientApp:
    """Logs what each train message carried; partition ``forget[0]`` loses its node state
    just before round ``forget[1]``, as a restarted device would."""

    def tap(msg: Message, context: Context, call_next: Any) -> Message:
        if msg.metadata.message_type != "train":
            return call_next(msg, context)
        ins = wire.decode_train_ins(msg.content)
        if (ins.partition_id, ins.server_round) == forget:
            for key in list(context.state.keys()):
                del context.state[key]
        entry = {
            "round": ins.server_round, "partition": ins.partition_id,
            "records": sorted(msg.content.array_records), "bytes": traffic.record_bytes(msg.content),
            "error": True,
        }  # fmt: skip
        try:  # a ClientApp exception reaches the server as an error reply
            reply = call_next(msg, context)
            entry["error"] = False
            return reply
        finally:
            entry["view"] = nodestate.read_view(context.state)[0]
            with log_path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")

    return make_client_app(mods=[tap])


def test_downlink_changes_and_recovery_after_lost_state(tmp_path: Path) -> None:
    raw = {
        **COMPRESSED,
        "federation": {"rounds": 4, "min_clients": 2},
        "compression": {"density": 0.1, "downlink": True},
    }
    log_path = tmp_path / "tap.jsonl"
    simulate(
        config_from_dict(raw), tmp_path / "run", client_app=forgetful_client_app(log_path, (1, 3))
    )
    log = {
        (e["partition"], e["round"]): e for e in map(json.loads, log_path.read_text().splitlines())
    }
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    n_params = json.loads((tmp_path / "run" / "summary.json").read_text())["adapter_parameters"]
    for p in (0, 2):  # fp32 adapters once, then compressed changes only
        assert log[(p, 1)]["records"] == [wire.ADAPTERS]
        assert [log[(p, r)]["records"] for r in (2, 3, 4)] == [[wire.PACKED]] * 3
        assert [log[(p, r)]["view"] for r in (1, 2, 3, 4)] == [0, 1, 2, 3]
        # the run config travels in every message; the adapters' bytes shrink ~10x
        assert log[(p, 1)]["bytes"] - log[(p, 2)]["bytes"] > 0.8 * 4 * n_params
    # the node that lost its view fails round 3 with a reason, then gets fp32 adapters again
    assert log[(1, 3)]["error"] and not log[(1, 4)]["error"]
    assert log[(1, 4)]["records"] == [wire.ADAPTERS]
    (rejected,) = rows[2]["rejected"]
    assert rejected["client"] == 1 and "against view 1, this node holds -1" in rejected["reason"]
    assert sorted(rows[3]["clients"]) == [0, 1, 2] and rows[3]["rejected"] == []
    assert rows[0]["downlink_bytes"] - rows[1]["downlink_bytes"] > 3 * 0.8 * 4 * n_params
    comp = json.loads((tmp_path / "run" / "summary.json").read_text())["compression"]
    assert comp["downlink_fp32_bytes_total"] == sum(r["downlink_fp32_bytes"] for r in rows)
    assert comp["downlink_ratio_vs_fp32"] > 1.5  # tiny model: the run config weighs most
