"""fedpeft ClientApp: decode the message, call :mod:`fedpeft.client`, encode the reply.

The node answers the server's query with its node config (in simulation Flower's
``partition-id``; a real device declares it with ``--node-config "partition-id=N"``);
the server then names the partition in every train message, so both sides agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft import client, wire


def query(msg: Message, context: Context) -> Message:
    """Tell the server who this node is (its node config: partition, later its profile)."""
    return Message(wire.encode_profile(dict(context.node_config)), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    ins = wire.decode_train_ins(msg.content)
    res = client.train_round(ins)
    return Message(wire.encode_train_res(res), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    ins = wire.decode_train_ins(msg.content)
    n, metrics = client.evaluate_round(ins)
    return Message(wire.encode_eval_res(n, metrics), reply_to=msg)


def make_client_app(mods: Sequence[Any] = ()) -> ClientApp:
    """fedpeft's ClientApp, optionally behind Flower client mods (taps, timers, DP)."""
    built = ClientApp(mods=list(mods))
    built.query()(query)
    built.train()(train)
    built.evaluate()(evaluate)
    return built


app = make_client_app()
