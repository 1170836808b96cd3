"""AdapterFedAvg: Flower's FedAvg whose rounds are :class:`fedpeft.rounds.ServerRounds`.

Only ``configure_train``/``aggregate_train`` (and their evaluate twins) are overridden,
and only to translate: Flower's records and messages in, plain states and replies to
``ServerRounds``, and its results back out. The round loop is Flower's own
``Strategy.start``.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft import wire
from fedpeft.config import Config
from fedpeft.rounds import Reply, ServerRounds


def _last_line(text: str | None, limit: int = 300) -> str:
    """The final line of a client's traceback: the exception and its message (without
    the ``'>`` of the exception repr Flower wraps it in)."""
    lines = [ln.strip().removesuffix("'>") for ln in str(text).splitlines()]
    lines = [ln for ln in lines if ln]
    return (lines[-1] if lines else str(text))[:limit]


def replies_of(sent: list[Message], received: Iterable[Message]) -> list[Reply]:
    """The replies to the messages ``sent`` (as pushed), as :class:`Reply`. An error the
    SuperLink writes on a node's behalf ("Node Unavailable") comes from the SuperLink
    itself, so it is traced back to the message it answers (Flower sets the IDs of the
    messages it pushes)."""
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}

    def node_of(reply: Message) -> int:
        return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    return [
        Reply(node_of(m), error=_last_line(m.error.reason))
        if m.has_error()
        else Reply(node_of(m), content=m.content)
        for m in received
    ]


class AdapterFedAvg(FedAvg):
    """FedAvg over LoRA adapters of any aggregator in the registry."""

    def __init__(self, cfg: Config, rounds: ServerRounds) -> None:
        fed = cfg.federation
        super().__init__(
            fraction_train=fed.fraction_train,
            fraction_evaluate=1.0,  # configure_evaluate below decides (federation.client_eval)
            min_train_nodes=fed.min_clients,
            min_available_nodes=fed.min_clients,
        )
        self.cfg = cfg
        self.rounds = rounds
        self._outbox: list[Message] = []  # this round's messages (their IDs once pushed)

    def _messages(
        self, server_round: int, arrays: ArrayRecord, nodes: list[int], kind: str
    ) -> list[Message]:
        contents = self.rounds.instructions(server_round, wire.record_to_state(arrays), nodes)
        # the round waits ``timeout`` for replies; an instruction older than that is void,
        # so a node back from a crash trains on the current round, not on the rounds the
        # SuperLink queued while it was away (each a round behind)
        ttl = self.cfg.federation.timeout
        messages = [
            Message(content, dst_node_id=node, message_type=kind, ttl=ttl)
            for node, content in contents.items()
        ]
        self._outbox = messages
        return messages

    def _replies(self, messages: Iterable[Message]) -> list[Reply]:
        return replies_of(self._outbox, messages)

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.rounds.round_offset  # Flower counts from 1 in every process
        nodes = self.rounds.sample(server_round, self.cfg.federation.fraction_train)
        return self._messages(server_round, arrays, nodes, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.rounds.round_offset
        new_state = self.rounds.train(server_round, self._replies(replies))
        if new_state is None:
            return None, None
        loss = self.rounds.stats[server_round].train_loss or 0.0
        return wire.state_to_record(new_state), MetricRecord({wire.TRAIN_LOSS: loss})

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.rounds.round_offset
        if not self.cfg.federation.client_eval:
            return []
        nodes = self.rounds.sample(server_round, 1.0)
        return self._messages(server_round, arrays, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.rounds.round_offset
        metrics = self.rounds.evaluation(server_round, self._replies(replies))
        return None if metrics is None else MetricRecord(metrics)  # type: ignore[arg-type]
