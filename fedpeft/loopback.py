"""An in-process Flower Grid: a ServerApp and its ClientApp nodes in one process, no Ray.

Flower's own runtimes move every message through a SuperLink (the simulation's
``InMemoryGrid`` and the Ray backend, or gRPC in a deployment). :class:`LoopbackGrid`
implements the same :class:`flwr.serverapp.Grid` interface by calling each node's
ClientApp directly, one message at a time, so a whole run of the real ServerApp, strategy,
ClientApp and client mods takes seconds with a tiny model. It keeps what makes a round a
round:

- every message crosses a wire: it is serialized to Flower's protobuf and read back on
  each hop (``flwr.common.serde``), so the two sides share no object;
- every node has its own :class:`flwr.app.Context`, whose ``state`` persists from one
  message to the next as a SuperNode's does, and a simulation's node config
  (``partition-id``, ``num-partitions``);
- a ClientApp that raises becomes an error reply, as Flower's runtime makes it;
- torch runs the clients on ``client_cpus`` threads (rounded down), as a Ray actor holding
  that many CPUs does (:mod:`fedpeft.threads`), so the floating-point results match a simulation's.

What it does not show (Ray placement, processes starting, timeouts, TLS, nodes leaving)
is left to the simulation and deployment tests. Its use is the golden runs
(``tests/test_golden.py``) and every test of a round's logic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.threads import threads_for

RUN_ID = 1
FIRST_NODE_ID = 1001  # any ids distinct from the SuperLink's would do

log = logging.getLogger("fedpeft")


def over_the_wire(message: Message) -> Message:
    """The message as its receiver reads it: serialized and parsed again."""
    return message_from_proto(message_to_proto(message))


@contextmanager
def torch_threads(threads: int | None) -> Any:
    """torch on ``threads`` intra-op threads inside the block (None: as it is)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LoopbackGrid(Grid):
    """``num_nodes`` ClientApp nodes behind a Grid, answered in the calling thread."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        client_cpus: float | None = None,
        node_configs: Sequence[UserConfig] | None = None,
    ) -> None:
        """``node_configs``: what each node declares, as a SuperNode's ``--node-config``
        does (default: a simulation's ``partition-id`` and ``num-partitions``)."""
        if num_nodes < 1:
            raise ValueError(f"A loopback grid needs at least one node, not {num_nodes}.")
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError(f"{len(node_configs)} node configs for {num_nodes} nodes.")
        self.client_app = client_app
        # as fedpeft.threads gives a Ray actor holding client_cpus CPUs
        self.client_threads = None if client_cpus is None else threads_for(client_cpus)
        configs = node_configs or [
            {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)
        ]
        self.contexts = {
            FIRST_NODE_ID + i: Context(
                run_id=RUN_ID,
                node_id=FIRST_NODE_ID + i,
                node_config=dict(config),
                state=RecordDict(),
                run_config={},
            )
            for i, config in enumerate(configs)
        }
        self._run = Run.create_empty(RUN_ID)
        self._replies: dict[str, Message] = {}
        self.delivered = 0  # messages handed to a ClientApp

    # ------------------------------------------------------------------ Grid
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            reply = self._deliver(msg)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[msg.metadata.message_id] = over_the_wire(reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))

    # ------------------------------------------------------------------ nodes
    def _deliver(self, msg: Message) -> Message:
        """The node's reply to one message; an exception becomes an error reply."""
        context = self.contexts.get(msg.metadata.dst_node_id)
        received = over_the_wire(msg)
        if context is None:
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="no such node"),
                reply_to=received,
            )
        self.delivered += 1
        try:
            with torch_threads(self.client_threads):
                return self.client_app(received, context)
        except Exception as err:  # Flower's runtime reports it, it does not raise
            log.error("the ClientApp of node %d raised", msg.metadata.dst_node_id, exc_info=True)
            reason = f"{type(err)}:<'{err}'>"  # the form Flower's runtime writes
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=received,
            )


def run_loopback(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    client_cpus: float | None = None,
    node_configs: Sequence[UserConfig] | None = None,
) -> LoopbackGrid:
    """Run ``server_app`` to its end against ``num_nodes`` in-process ClientApp nodes, each
    message answered with torch on ``client_cpus`` threads; returns the grid (its nodes'
    contexts hold their final state)."""
    grid = LoopbackGrid(client_app, num_nodes, client_cpus, node_configs)
    context = Context(
        run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={}
    )
    # what Flower's ServerApp process sets before it runs the app: a Message takes its
    # run id and source node from it
    TaskIdentity.task_id, TaskIdentity.run_id = 1, RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server_app(grid, context)
    return grid
