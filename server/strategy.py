"""AdapterFedAvg: Flower's FedAvg with adapters-only messages, seeded sampling of
partitions, validation of every reply, and byte accounting.

Only ``configure_train``/``aggregate_train`` (and their evaluate twins) are overridden;
the round loop is Flower's own ``Strategy.start``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft import wire
from fedpeft.aggregation import (
    ClientUpdate,
    MergesIntoBase,
    State,
    get_aggregator,
    merge_stacks,
    server_step,
)
from fedpeft.aggregation.base import LORA_B
from fedpeft.audit.membership import CanaryAudit
from fedpeft.audit.tap import AuditTap
from fedpeft.compression import codec
from fedpeft.compression.compeft import apply_change, downlink_change
from fedpeft.config import Config, lora_to_json
from fedpeft.models import adapter_shapes
from fedpeft.planning import FleetPlan
from fedpeft.privacy.accounting import (
    Entry,
    add_steps,
    epsilon,
    from_lists,
    noise_multiplier,
    to_lists,
)
from fedpeft.privacy.mechanisms import clip, dp_fedavg, global_norm

log = logging.getLogger("fedpeft")


@dataclass
class RoundStats:
    """What one round moved and who took part; becomes a ``metrics.jsonl`` line."""

    started: float = field(default_factory=time.perf_counter)
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    # what the accepted updates would have cost as fp32 arrays, and (compressed) their
    # payload (bitstreams + scales) against its information bound, in bytes
    uplink_fp32_bytes: int = 0
    uplink_payload_bytes: int = 0
    uplink_bound_bytes: float = 0.0
    uplink_kept_values: int = 0
    downlink_fp32_bytes: int = 0  # what the messages would have cost with fp32 adapters
    epsilon: float | None = None  # ε spent so far (DP runs)
    clients: list[int] = field(default_factory=list)  # partition ids, stable across runs
    rejected: list[dict[str, object]] = field(default_factory=list)
    train_loss: float | None = None
    client_eval: dict[str, float] = field(default_factory=dict)
    audit: dict[str, dict[str, float]] = field(default_factory=dict)  # the audit tap's scores
    # seconds each client reported: from its process's start to its first round (0 when
    # its process served an earlier round), to have its model and data ready, to train
    startup_seconds: list[float] = field(default_factory=list)
    placement: dict[int, tuple[str, str]] = field(default_factory=dict)  # client: Ray node, host
    load_seconds: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    _examples: int = 0

    def add_loss(self, loss: float, examples: int) -> None:
        """Running example-weighted mean of the clients' training losses."""
        total = self._examples + examples
        self.train_loss = ((self.train_loss or 0.0) * self._examples + loss * examples) / total
        self._examples = total


def user_noise(cfg: Config, num_nodes: int) -> float:
    """z of DP-FedAvg: configured, or what spends ε over the configured rounds at
    q = sampled / nodes."""
    priv, fed = cfg.privacy, cfg.federation
    q = fed.sampled(num_nodes) / num_nodes
    return noise_multiplier(
        priv.noise_multiplier, priv.epsilon, priv.delta, q, fed.rounds, priv.accountant
    )


def _count_compression(
    stats: RoundStats, res: wire.TrainRes, content: RecordDict, sent_bytes: int
) -> None:
    if res.compressed is None:
        stats.uplink_fp32_bytes += sent_bytes
        return
    fp32 = dataclasses.replace(res, compressed=None)
    stats.uplink_fp32_bytes += wire.record_bytes(wire.encode_train_res(fp32))
    stats.uplink_payload_bytes += wire.payload_bytes(content)
    stats.uplink_bound_bytes += codec.bound_bytes(res.compressed)
    stats.uplink_kept_values += sum(t.sparse.positions.size for t in res.compressed.values())


def _last_line(text: str | None, limit: int = 300) -> str:
    """The final line of a client's traceback: the exception and its message (without
    the ``'>`` of the exception repr Flower wraps it in)."""
    lines = [ln.strip().removesuffix("'>") for ln in str(text).splitlines()]
    lines = [ln for ln in lines if ln]
    return (lines[-1] if lines else str(text))[:limit]


class AdapterFedAvg(FedAvg):
    """FedAvg over LoRA adapters of any aggregator in the registry."""

    def __init__(
        self,
        cfg: Config,
        num_labels: int,
        partitions: dict[int, int],
        fleet: FleetPlan,
    ) -> None:
        fed = cfg.federation
        super().__init__(
            fraction_train=fed.fraction_train,
            fraction_evaluate=1.0,  # configure_evaluate below decides (federation.client_eval)
            min_train_nodes=fed.min_clients,
            min_available_nodes=fed.min_clients,
        )
        self.cfg = cfg
        self.config_json = cfg.to_json()
        self.num_labels = num_labels
        self.partitions = partitions  # node id -> partition id, from the query round
        self.aggregator = get_aggregator(fed.aggregator)
        self.stats: dict[int, RoundStats] = {}
        self._global: State = {}
        self._sent: dict[int, State] = {}  # node id -> the adapters it was sent this round
        self._outbox: list[Message] = []  # this round's messages (their IDs once pushed)
        self._sent_to: dict[str, int] | None = None  # message ID -> node, from the outbox
        # downlink compression: node id -> the adapters it holds, and their view number
        self._views: dict[int, State] = {}
        self._view_numbers: dict[int, int] = {}
        # FLoRA: each round's stacked update, kept until every node has merged it
        self.stacks: dict[int, State] = {}
        self.merged_round: dict[int, int] = {}  # node id -> last round it has merged
        self._merges_sent: dict[int, int] = {}  # node id -> last round in its message
        self.base_delta: State = {}  # module -> Σ of merged ΔW (what the evaluator adds)
        # differential privacy: the server's accountant (user level) or the largest ε a
        # client reported (record level, local); the user-level noise's source
        self.history: list[Entry] = []
        self.client_epsilon: dict[int, float] = {}
        self.noise_rng = np.random.default_rng(cfg.privacy.noise_seed)
        self.canary_audit: CanaryAudit | None = None
        self.round_offset = 0  # --resume: rounds a previous process already ran
        self.final: State = {}  # the last aggregate (the canary audit's θ_T)
        self.user_noise = user_noise(cfg, len(partitions)) if cfg.privacy.mode == "user" else 0.0
        self.lora_json = {pid: lora_to_json(lo) for pid, lo in fleet.client_loras.items()}
        self.client_loras = fleet.client_loras
        self.tap: AuditTap | None = None  # set by the ServerApp with audit.tap_every
        self.shapes = {
            pid: adapter_shapes(cfg.model, lora, num_labels)
            for pid, lora in fleet.client_loras.items()
        }

    # ------------------------------------------------------------------ sampling
    def sample(self, server_round: int, fraction: float) -> list[int]:
        """Seeded choice of nodes, made on partition ids so it repeats across runs."""
        by_partition = sorted(self.partitions, key=lambda n: self.partitions[n])
        k = self.cfg.federation.sampled(len(by_partition), fraction)
        rng = np.random.default_rng([self.cfg.seed, server_round])
        chosen = rng.choice(len(by_partition), size=min(k, len(by_partition)), replace=False)
        return [by_partition[i] for i in sorted(chosen)]

    def _messages(
        self, server_round: int, arrays: ArrayRecord, nodes: list[int], kind: str
    ) -> list[Message]:
        """One message per node: the global adapters cut to that client's plan."""
        self._global = wire.record_to_state(arrays)
        stats = self.stats.setdefault(server_round, RoundStats())
        self._sent = {}
        messages = []
        for node in nodes:
            pid = self.partitions[node]
            target = self.aggregator.cut(self._global, self.shapes[pid], self.cfg.lora.scaling_for)
            merges = self._unmerged(node)
            ins = wire.TrainIns(
                server_round,
                self.config_json,
                self.num_labels,
                target,
                self.lora_json[pid],
                partition_id=pid,
                merges=merges,
            )
            full = ins
            ins = self._compressed_downlink(node, ins)
            self._sent[node] = ins.adapters if ins.downlink is None else self._views[node]
            self._merges_sent[node] = max(merges, default=self.merged_round.get(node, 0))
            content = wire.encode_train_ins(ins)
            stats.downlink_bytes += wire.record_bytes(content)
            stats.downlink_fp32_bytes += wire.record_bytes(
                content if ins is full else wire.encode_train_ins(full)
            )
            # the round waits ``timeout`` for replies; an instruction older than that is
            # void, so a node back from a crash trains on the current round, not on the
            # rounds the SuperLink queued while it was away (each a round behind)
            ttl = self.cfg.federation.timeout
            messages.append(Message(content, dst_node_id=node, message_type=kind, ttl=ttl))
        self._outbox, self._sent_to = messages, None
        return messages

    def _node_of(self, reply: Message) -> int:
        """The node a reply stands for. An error the SuperLink writes on a node's behalf
        ("Node Unavailable") comes from the SuperLink itself, so it is traced back to
        the message it answers (Flower sets the IDs of the messages it pushes)."""
        if self._sent_to is None:  # message IDs exist only once Flower has pushed them
            self._sent_to = {
                m.metadata.message_id: m.metadata.dst_node_id
                for m in self._outbox
                if m.metadata.message_id
            }
        return self._sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _compressed_downlink(self, node: int, ins: wire.TrainIns) -> wire.TrainIns:
        """With ``compression.downlink``: send a node that holds a view of the adapters
        only the compressed change to them, and remember the view it will then hold. A
        node without one (first message, or after an error) gets the fp32 adapters."""
        comp = self.cfg.compression
        if not comp.downlink or comp.density is None:
            return ins
        number = self._view_numbers.get(node, -1)
        if node not in self._views:
            self._views[node] = ins.adapters
            self._view_numbers[node] = number + 1
            return dataclasses.replace(ins, view=number + 1)
        change = downlink_change(
            ins.adapters, self._views[node], comp.density, comp.scale, comp.alpha
        )
        self._views[node] = apply_change(self._views[node], change)
        self._view_numbers[node] = number + 1
        return dataclasses.replace(
            ins, adapters={}, downlink=codec.pack(change), base_view=number, view=number + 1
        )

    def _unmerged(self, node: int) -> dict[int, State]:
        """The stacked updates this node has not merged yet (FLoRA; else none)."""
        done = self.merged_round.get(node, 0)
        return {t: stack for t, stack in sorted(self.stacks.items()) if t > done}

    def _keep_stack(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """FLoRA: remember this round's stacked update for the nodes and the evaluator;
        forget the rounds that every node has merged."""
        assert isinstance(self.aggregator, MergesIntoBase)
        stack = self.aggregator.stack(self._global, updates, self.cfg.lora.scaling_for)
        eta = self.cfg.federation.server_lr  # W += η ΔW_t, folded into B for the nodes too
        stack = {k: v * np.float32(eta) if LORA_B in k else v for k, v in stack.items()}
        self.stacks[server_round] = stack
        self.base_delta = merge_stacks(self.base_delta, [stack])
        everyone = min((self.merged_round.get(n, 0) for n in self.partitions), default=0)
        self.stacks = {t: st for t, st in self.stacks.items() if t > everyone}

    # ------------------------------------------------------------------ checkpoint
    def export_state(self) -> dict[str, Any]:
        """The server-side state a resumed run needs (JSON-able)."""
        return {
            "history": to_lists(self.history),
            "client_epsilon": {str(k): v for k, v in self.client_epsilon.items()},
            "noise_rng": self.noise_rng.bit_generator.state,
        }

    def restore_state(self, state: dict[str, Any], completed_rounds: int) -> None:
        self.history = from_lists(**state["history"])
        self.client_epsilon = {int(k): float(v) for k, v in state["client_epsilon"].items()}
        self.noise_rng.bit_generator.state = state["noise_rng"]
        self.round_offset = completed_rounds

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset  # Flower counts from 1 in every process
        nodes = self.sample(server_round, self.cfg.federation.fraction_train)
        return self._messages(server_round, arrays, nodes, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self.stats[server_round]
        replies = sorted(replies, key=lambda m: self.partitions.get(self._node_of(m), 0))
        self._reject_silent(stats, {self._node_of(m) for m in replies})
        updates = [u for msg in replies if (u := self._accept(msg, stats)) is not None]
        if not updates:
            log.warning("round %d: no valid update; the global adapters stay", server_round)
            return None, None
        if isinstance(self.aggregator, MergesIntoBase):
            self._keep_stack(server_round, updates)
        if self.tap is not None and self.tap.due(server_round):  # sees what aggregation sees
            stats.audit = self.tap(
                server_round, [(u, self.client_loras[u.client_id]) for u in updates]
            )
        if self.cfg.privacy.mode == "user":
            new_state = self._dp_fedavg(updates)
        else:
            aggregate = self.aggregator.aggregate(self._global, updates, self.cfg.lora.scaling_for)
            new_state = server_step(self._global, aggregate, self.cfg.federation.server_lr)
        if not all(np.isfinite(v).all() for v in new_state.values()):
            # the last line of defence: whatever the aggregator or the server step made
            # of accepted updates, a non-finite global model is never installed
            log.warning(
                "round %d: the aggregate is not finite; the global adapters stay", server_round
            )
            stats.rejected.append({"client": -1, "node": -1, "reason": "non-finite aggregate"})
            return None, None
        self.final = new_state
        self._account(stats)
        return wire.state_to_record(new_state), MetricRecord(
            {"train-loss": stats.train_loss or 0.0}
        )

    def _bounded(self, res: wire.TrainRes) -> wire.TrainRes:
        """User-level DP: the decoded update clipped to C again, so that a client that did
        not clip (or whose compression lengthened it) cannot exceed its share."""
        if self.cfg.privacy.mode != "user":
            return res
        update, _ = clip(res.update, self.cfg.privacy.clip_norm)
        return dataclasses.replace(res, update=update)

    def _dp_fedavg(self, updates: list[ClientUpdate]) -> State:
        """DP-FedAvg: uniform sum of the clipped updates plus N(0, (zC)²), over m sampled
        (canary clients, with ``privacy.canaries``, count among the m)."""
        sampled = self.cfg.federation.sampled(len(self.partitions))
        canaries = self._canaries().this_round() if self.cfg.privacy.canaries else []
        return dp_fedavg(
            self._global,
            [u.delta for u in updates] + canaries,
            self.cfg.privacy.clip_norm,
            self.user_noise,
            sampled + len(canaries),
            self.noise_rng,
            self.cfg.federation.server_lr,
        )

    def _canaries(self) -> CanaryAudit:
        if self.canary_audit is None:  # the adapters of round 1 are θ_0
            priv, n = self.cfg.privacy, len(self.partitions)
            q = self.cfg.federation.sampled(n) / n
            self.canary_audit = CanaryAudit(
                self._global, priv.canaries, priv.clip_norm, q, seed=self.cfg.seed + 7919
            )
        return self.canary_audit

    def _account(self, stats: RoundStats) -> None:
        """ε after this round: the server's accountant steps once (user level), or the
        largest ε any client has reported (record level, local)."""
        priv = self.cfg.privacy
        if priv.mode == "user":
            q = self.cfg.federation.sampled(len(self.partitions)) / len(self.partitions)
            self.history = add_steps(self.history, self.user_noise, q, 1)
            stats.epsilon = epsilon(self.history, priv.delta, priv.accountant)
        elif priv.mode != "none":
            stats.epsilon = max(self.client_epsilon.values(), default=0.0)

    def _accept(self, msg: Message, stats: RoundStats) -> ClientUpdate | None:
        """Validate one reply; a bad one is recorded with its reason and left out."""
        node = self._node_of(msg)
        if msg.has_error():
            self._reject(stats, node, f"client error: {_last_line(msg.error.reason)}")
            return None
        if node not in self._sent:
            self._reject(stats, node, "a reply from a node that was sent no instruction")
            return None
        sent_bytes = wire.record_bytes(msg.content)
        stats.uplink_bytes += sent_bytes
        most = self.cfg.train.local_steps * self.cfg.train.batch_size  # examples a round sees
        try:
            res = wire.decode_train_res(msg.content, self._sent[node], most)
        except wire.UpdateRejected as err:
            self._reject(stats, node, str(err))
            return None
        _count_compression(stats, res, msg.content, sent_bytes)
        client_id = self.partitions.get(node, -1)
        bound = self.cfg.federation.max_update_norm
        if bound is not None and (norm := global_norm(res.update)) > bound:
            self._reject(stats, node, f"update norm {norm:.4g} exceeds max_update_norm {bound:g}")
            return None
        res = self._bounded(res)
        if res.epsilon is not None:
            self.client_epsilon[client_id] = res.epsilon
        self.merged_round[node] = self._merges_sent.get(node, 0)  # it merged what it got
        stats.clients.append(client_id)
        if res.train_loss is not None:
            stats.add_loss(res.train_loss, res.num_examples)
        if res.startup_seconds is not None:
            stats.startup_seconds.append(res.startup_seconds)
        if res.placement is not None:
            stats.placement[client_id] = res.placement
        if res.load_seconds is not None:
            stats.load_seconds.append(res.load_seconds)
        if res.train_seconds is not None:
            stats.train_seconds.append(res.train_seconds)
        return ClientUpdate(client_id, res.update, res.num_examples, sent=self._sent[node])

    def _reject_silent(self, stats: RoundStats, replied: set[int]) -> None:
        for node in sorted(set(self._sent) - replied):
            self._reject(stats, node, f"no reply within {self.cfg.federation.timeout:g} s")

    def _reject(self, stats: RoundStats, node: int, reason: str) -> None:
        self._views.pop(node, None)  # its view is unknown now: the next message is fp32
        client_id = self.partitions.get(node, -1)
        log.warning("rejected the update of client %d (node %d): %s", client_id, node, reason)
        stats.rejected.append({"client": client_id, "node": node, "reason": reason})

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.cfg.federation.client_eval:
            return []
        nodes = self.sample(server_round, 1.0)
        return self._messages(server_round, arrays, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.round_offset
        stats = self.stats[server_round]
        totals: dict[str, float] = {}
        count = 0
        for msg in replies:
            node = self._node_of(msg)
            if msg.has_error():
                self._reject(stats, node, f"evaluation failed: {_last_line(msg.error.reason)}")
                continue
            stats.uplink_bytes += wire.record_bytes(msg.content)
            try:
                n, metrics = wire.decode_eval_res(msg.content)
            except wire.UpdateRejected as err:
                self._reject(stats, node, str(err))
                continue
            count += n
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * n
        if count == 0:
            return None
        stats.client_eval = {k: v / count for k, v in totals.items()}
        return MetricRecord(stats.client_eval)  # type: ignore[arg-type]
