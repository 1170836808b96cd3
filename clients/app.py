"""fedpeft ClientApp: decode the message, call :mod:`fedpeft.client`, encode the reply.

In simulation the partition comes from Flower's ``partition-id`` node config; on a real
device the SuperNode declares it with ``--node-config "partition-id=N"``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft import client, wire

app = ClientApp()


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server who this node is (its node config: partition, later its profile)."""
    return Message(wire.encode_profile(dict(context.node_config)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    ins = wire.decode_train_ins(msg.content)
    res = client.train_round(ins, _partition_id(context))
    return Message(wire.encode_train_res(res), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    ins = wire.decode_train_ins(msg.content)
    n, metrics = client.evaluate_round(ins, _partition_id(context))
    return Message(wire.encode_eval_res(n, metrics), reply_to=msg)
