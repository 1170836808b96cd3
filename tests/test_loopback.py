"""The in-process Grid: real ClientApps answer real messages, one hop at a time."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.config import ConfigError, config_from_dict
from fedpeft.loopback import LoopbackGrid, run_loopback


def counting_app(seen: list[Message]) -> ClientApp:
    """Adds 1 to the array it gets and counts its messages in its node's state."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        seen.append(msg)
        if "fail" in msg.content.config_records:
            raise ValueError("asked to fail")
        calls = context.state.config_records.get("calls", ConfigRecord({"n": 0}))
        calls["n"] = int(calls["n"]) + 1  # type: ignore[call-overload]
        context.state.config_records["calls"] = calls
        x = msg.content.array_records["x"]["x"].numpy()
        content = RecordDict(
            {
                "x": ArrayRecord({"x": Array(x + 1)}),
                "who": ConfigRecord(
                    {"partition": int(context.node_config["partition-id"]), "calls": calls["n"]}
                ),
            }
        )
        return Message(content, reply_to=msg)

    return app


def message(node: int, value: float, fail: bool = False) -> Message:
    content = RecordDict({"x": ArrayRecord({"x": Array(np.full(3, value, dtype=np.float32))})})
    if fail:
        content.config_records["fail"] = ConfigRecord({"yes": 1})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, ttl=60.0)


@pytest.fixture
def grid() -> tuple[LoopbackGrid, list[Message]]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    seen: list[Message] = []
    return LoopbackGrid(counting_app(seen), num_nodes=3), seen


def test_each_node_answers_from_its_own_state_with_a_copy_of_the_message(
    grid: tuple[LoopbackGrid, list[Message]],
) -> None:
    loop, seen = grid
    nodes = sorted(loop.get_node_ids())
    sent = [message(n, float(i)) for i, n in enumerate(nodes)] + [message(nodes[0], 5.0)]
    replies = list(loop.send_and_receive(sent))
    assert len(replies) == 4 and loop.delivered == 4
    by_request = {r.metadata.reply_to_message_id: r for r in replies}
    for msg, value in zip(sent, [0.0, 1.0, 2.0, 5.0], strict=True):
        reply = by_request[msg.metadata.message_id]
        np.testing.assert_array_equal(reply.content.array_records["x"]["x"].numpy(), value + 1)
    who = [dict(by_request[m.metadata.message_id].content.config_records["who"]) for m in sent]
    # node config as in a simulation; the first node's state counted both its messages
    assert who == [
        {"partition": 0, "calls": 1},
        {"partition": 1, "calls": 1},
        {"partition": 2, "calls": 1},
        {"partition": 0, "calls": 2},
    ]
    # the ClientApp read the message from its serialized form, not the server's object
    assert all(a is not b for a, b in zip(seen, sent, strict=True))
    assert seen[0].content.array_records["x"] is not sent[0].content.array_records["x"]


def test_a_client_app_that_raises_becomes_an_error_reply(
    grid: tuple[LoopbackGrid, list[Message]],
) -> None:
    loop, _ = grid
    node = sorted(loop.get_node_ids())[0]
    (reply,) = loop.send_and_receive([message(node, 0.0, fail=True)])
    assert reply.has_error() and "asked to fail" in reply.error.reason
    (lost,) = loop.send_and_receive([message(424242, 0.0)])
    assert lost.has_error() and "no such node" in lost.error.reason


def test_a_grid_needs_a_node() -> None:
    with pytest.raises(ValueError, match="at least one node"):
        LoopbackGrid(ClientApp(), num_nodes=0)


def test_the_runtime_is_checked_in_one_sentence() -> None:
    with pytest.raises(ConfigError, match=r"'simulation\.runtime' should be one of ray"):
        config_from_dict({"simulation": {"runtime": "threads"}})
    with pytest.raises(ConfigError, match=r"needs 'simulation\.runtime: ray'"):
        config_from_dict({"simulation": {"runtime": "inprocess", "ray_address": "auto"}})


def test_run_loopback_runs_a_server_app_to_its_end() -> None:
    from flwr.serverapp import Grid, ServerApp

    seen: list[Message] = []
    server = ServerApp()
    totals: list[float] = []

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        replies = grid.send_and_receive([message(n, 1.0) for n in grid.get_node_ids()])
        totals.append(sum(float(r.content.array_records["x"]["x"].numpy().sum()) for r in replies))

    grid = run_loopback(server, counting_app(seen), num_nodes=2, client_cpus=1.5)
    assert totals == [12.0] and grid.client_threads == 1 and len(seen) == 2
