"""The server's side of a round, without Flower: which nodes take part, what each is
sent, whether a reply is accepted (or why not), what the accepted updates aggregate to,
and the round's statistics.

:class:`ServerRounds` works on plain objects: adapter states (name -> numpy array), the
records :mod:`fedpeft.wire` encodes and decodes, and :class:`Reply` (a node's answer or
its error). ``server/strategy.py`` translates Flower's messages to and from these, so
every rule here is unit-tested without a simulation (``tests/test_rounds.py``).

A round, in order (docs/architecture.md, "One round"):

1. :meth:`ServerRounds.sample` draws the nodes, seeded by (seed, round) on partition ids.
2. :meth:`ServerRounds.instructions` cuts the global adapters to each client's plan,
   adds the FLoRA stacks it has not merged, and with ``compression.downlink`` sends only
   the compressed change to the view the node holds.
3. :meth:`ServerRounds.train` accepts or rejects each reply (client error, unknown
   node, undecodable or out-of-bound update, then the reply stages of
   :mod:`fedpeft.stages`: the norm gate, the central re-clip), runs the round stages
   (FLoRA's ledger, the audit observer, then the aggregator and the server step of
   Reddi et al. (2021), or DP-FedAvg's noisy sum), refuses a non-finite result, and
   steps the privacy accountant.

Which stages run is decided once, by :func:`fedpeft.stages.build`; this module reads no
mode.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import RecordDict

from fedpeft import lora_sb, stages, traffic, wire
from fedpeft.aggregation import ClientUpdate, State
from fedpeft.audit.membership import CanaryAudit
from fedpeft.compression import codec
from fedpeft.config import Config, lora_to_json
from fedpeft.models import adapter_shapes, is_head
from fedpeft.planning import FleetPlan
from fedpeft.privacy.accounting import Entry, affordable_steps, from_lists, to_lists

log = logging.getLogger("fedpeft")
T = TypeVar("T")


@dataclass(frozen=True)
class Reply:
    """A node's answer to this round's instruction: its content, or the last line of
    the error its runtime reported in its place."""

    node: int
    content: RecordDict | None = None
    error: str | None = None


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
    # per client: the seconds it reported, by phase (startup, load, train)
    timing: dict[int, dict[str, float]] = field(default_factory=dict)
    _examples: int = 0

    def add_loss(self, loss: float, examples: int) -> None:
        """Running example-weighted mean of the clients' training losses."""
        total = self._examples + examples
        self.train_loss = ((self.train_loss or 0.0) * self._examples + loss * examples) / total
        self._examples = total


def _timing(res: wire.TrainRes) -> dict[str, float]:
    phases = {
        "startup": res.startup_seconds,
        "load": res.load_seconds,
        "train": res.train_seconds,
    }
    return {k: round(v, 3) for k, v in phases.items() if v is not None}


def _count_compression(
    stats: RoundStats, res: wire.TrainRes, content: RecordDict, sent_bytes: int
) -> None:
    if res.compressed is None:
        stats.uplink_fp32_bytes += sent_bytes
        return
    fp32 = dataclasses.replace(res, compressed=None)
    stats.uplink_fp32_bytes += traffic.record_bytes(wire.encode_train_res(fp32))
    stats.uplink_payload_bytes += traffic.payload_bytes(content)
    stats.uplink_bound_bytes += codec.bound_bytes(res.compressed)
    stats.uplink_kept_values += sum(t.sparse.positions.size for t in res.compressed.values())


class ServerRounds:
    """Every round's server-side state and rules, for any aggregator in the registry.

    ``partitions``: node id -> partition id (from the query round); ``fleet``: each
    partition's LoRA plan. ``round_offset`` is the rounds a previous process ran
    (``--resume``): the round numbers given here are the run's, not the process's.
    """

    def __init__(
        self, cfg: Config, num_labels: int, partitions: dict[int, int], fleet: FleetPlan
    ) -> None:
        self.cfg = cfg
        self.config_json = cfg.to_json()
        self.num_labels = num_labels
        self.partitions = partitions
        # the stages the config asks for (fedpeft.stages.build, their only chooser)
        self.stages = stages.build(cfg, len(partitions), fleet.client_loras)
        assert self.stages.accountant is not None and self.stages.aggregator is not None
        self.accountant = self.stages.accountant
        self.aggregator = self.stages.aggregator
        self.ledger = _stage(self.stages.round, stages.FloraLedger)
        self.observer = _stage(self.stages.round, stages.AuditObserver)
        self.noisy_sum = _stage(self.stages.round, stages.NoisySum)
        server_step = _stage(self.stages.round, stages.ServerStep)
        assert server_step is not None, "every round ends with the server step"
        self.optimizer = server_step.optimizer
        self.stats: dict[int, RoundStats] = {}
        self.global_state: State = {}  # the adapters this round's instructions were cut from
        self.sent: dict[int, State] = {}  # node id -> the adapters it holds this round
        self.round_offset = 0
        self.final: State = {}  # the last aggregate (the canary audit's θ_T)
        self.lora_json = {pid: lora_to_json(lo) for pid, lo in fleet.client_loras.items()}
        self.client_loras = fleet.client_loras
        sparse = cfg.sparse if cfg.peft.method == "sparse" else None
        self.shapes = {
            pid: self._exchanged(adapter_shapes(cfg.model, lora, num_labels, sparse))
            for pid, lora in fleet.client_loras.items()
        }
        self.global_lora = fleet.global_lora
        # the adapter's fixed structure (LoRA-SB's basis, the sparse mask, as sent), and
        # the nodes that were sent it
        self.structure: State | None = None
        self.structure_digest = ""
        self.holding: set[int] = set()
        self.burnin = RoundStats()  # the burn-in's traffic (LoRA-SB, SAM), before round 1
        self.density: dict[str, float] = {}  # sparse: the real density per matrix shape

    def _exchanged(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        sb = self.cfg.peft.method == "lora_sb"
        return lora_sb.exchanged_shapes(shapes) if sb else shapes

    def carried(self, state: State) -> State:
        """The adapter state a LoRA model holds for exchanged ``state``: itself, or for
        LoRA-SB the carrier LoRA of the Rs in the run's basis."""
        if self.structure is None or self.cfg.peft.method != "lora_sb":
            return state
        return lora_sb.to_lora(state, lora_sb.basis_from_wire(self.structure))

    # ------------------------------------------------------------------ burn-in
    def burnin_instructions(self, nodes: list[int], start: State) -> dict[int, RecordDict]:
        """The burn-in message (``train.burnin``) per node: the run's config, the node's
        plan and the initial task head (no adapter tensor: the burn-in runs at the base
        model)."""
        head = {k: v for k, v in start.items() if is_head(k)}
        self.sent = {}
        contents = {}
        for node in nodes:
            pid = self.partitions[node]
            ins = wire.TrainIns(
                0, self.config_json, self.num_labels, head, self.lora_json[pid], pid
            )
            contents[node] = wire.encode_train_ins(ins)
            self.burnin.downlink_bytes += traffic.record_bytes(contents[node])
            self.sent[node] = head
        return contents

    def burnin_sums(
        self, replies: list[Reply], modules: dict[str, tuple[int, int]], steps: int
    ) -> State:
        """The sum of the burn-in replies' decoded gradients (module -> m×n); a bad reply
        is left out, as in a round, and none at all ends the run in one sentence."""
        stats = self.burnin
        expected = {m: np.zeros(shape, np.float32) for m, shape in modules.items()}
        sums = {m: np.zeros(shape, np.float64) for m, shape in modules.items()}
        most = steps * self.cfg.train.batch_size
        for reply in sorted(replies, key=lambda r: self.partitions.get(r.node, 0)):
            if reply.error is not None or reply.content is None:
                self._reject(stats, reply.node, f"client error: {reply.error}")
                continue
            stats.uplink_bytes += traffic.record_bytes(reply.content)
            try:
                res = wire.decode_train_res(reply.content, expected, most)
            except wire.UpdateRejected as err:
                self._reject(stats, reply.node, str(err))
                continue
            for m in sums:
                sums[m] += res.update[m]
            stats.clients.append(self.partitions.get(reply.node, -1))
        if not stats.clients:
            raise RuntimeError(
                "No node answered the burn-in, so the adapter's structure cannot be chosen; "
                f"rejected: {[r['reason'] for r in stats.rejected][:3]}."
            )
        return sums

    def install_structure(self, structure: State, initial: State, start: State) -> State:
        """Keep the run's fixed adapter structure (LoRA-SB's basis, the sparse mask; sent
        to each node once) and return the exchanged start state: the adapter tensors
        ``initial`` (LoRA-SB's Rs, the sparse values) and the task head of ``start``."""
        self.structure, self.structure_digest = structure, lora_sb.digest(structure)
        head = {k: v for k, v in start.items() if is_head(k)}
        return {**head, **initial}

    # the state of the stages that own it, as the evaluator, summary and tests read it
    @property
    def base_delta(self) -> State:
        """Σ of FLoRA's merged ΔW, module -> ΔW (what the evaluator adds); else {}."""
        return self.ledger.base_delta if self.ledger is not None else {}

    @property
    def user_noise(self) -> float:
        """z of DP-FedAvg (user-level DP), else 0."""
        return self.accountant.noise

    @property
    def history(self) -> list[Entry]:
        return self.accountant.history

    @property
    def noise_rng(self) -> np.random.Generator:
        assert self.noisy_sum is not None, "only user-level DP adds noise on the server"
        return self.noisy_sum.rng

    @property
    def canary_audit(self) -> CanaryAudit | None:
        return self.noisy_sum.canary_audit if self.noisy_sum is not None else None

    @property
    def tap(self) -> stages.Tap | None:
        return self.observer.tap if self.observer is not None else None

    @tap.setter
    def tap(self, tap: stages.Tap) -> None:
        assert self.observer is not None, "the tap needs 'audit.tap_every'"
        self.observer.tap = tap

    # ------------------------------------------------------------------ sampling
    def sample(self, server_round: int, fraction: float) -> list[int]:
        """Seeded choice of nodes, made on partition ids so it repeats across runs."""
        by_partition = sorted(self.partitions, key=lambda n: self.partitions[n])
        k = self.cfg.federation.sampled(len(by_partition), fraction)
        rng = np.random.default_rng([self.cfg.seed, server_round])
        chosen = rng.choice(len(by_partition), size=min(k, len(by_partition)), replace=False)
        return [by_partition[i] for i in sorted(chosen)]

    # ------------------------------------------------------------------ instructions
    def instructions(
        self, server_round: int, global_state: State, nodes: list[int]
    ) -> dict[int, RecordDict]:
        """One instruction per node: the global adapters cut to that client's plan."""
        self.global_state = global_state
        stats = self.stats.setdefault(server_round, RoundStats())
        self.sent = {}
        contents = {}
        for node in nodes:
            pid = self.partitions[node]
            target = self.aggregator.cut(global_state, self.shapes[pid], self.cfg.lora.scaling_for)
            merges = self.ledger.unmerged(node) if self.ledger is not None else {}
            full = wire.TrainIns(
                server_round,
                self.config_json,
                self.num_labels,
                target,
                self.lora_json[pid],
                partition_id=pid,
                merges=merges,
                **self._structure_for(node),
            )
            ins, self.sent[node] = (
                self.stages.downlink(node, full) if self.stages.downlink else (full, target)
            )
            content = wire.encode_train_ins(ins)
            stats.downlink_bytes += traffic.record_bytes(content)
            stats.downlink_fp32_bytes += traffic.record_bytes(
                content if ins is full else wire.encode_train_ins(full)
            )
            contents[node] = content
        return contents

    def _structure_for(self, node: int) -> dict[str, Any]:
        """The fixed structure's digest always, the structure itself once per node (again
        after a rejection: the node may have lost it)."""
        if self.structure is None:
            return {}
        if node in self.holding:
            return {"structure_digest": self.structure_digest}
        self.holding.add(node)
        return {"structure_digest": self.structure_digest, "structure": self.structure}

    def affordable_rounds(self) -> int:
        """The run's last round: ``federation.rounds``, or with user-level DP at a fixed z
        and a budget ε the rounds the budget affords (ε depends only on z, q and the
        number of rounds, so this is known before round 1)."""
        priv, rounds = self.cfg.privacy, self.cfg.federation.rounds
        if self.noisy_sum is None or priv.epsilon is None or priv.noise_multiplier is None:
            return rounds
        nodes = len(self.partitions)
        q = self.cfg.federation.sampled(nodes) / nodes
        afforded = affordable_steps(
            self.user_noise, q, priv.epsilon, priv.delta, rounds, priv.accountant
        )
        if afforded == 0:
            raise RuntimeError(
                f"The privacy budget ε = {priv.epsilon:g} does not afford one round at "
                f"noise multiplier {self.user_noise:g}; raise one of them."
            )
        if afforded < rounds:
            log.warning(
                "privacy budget ε = %g affords %d of %d rounds; the run stops after round %d",
                priv.epsilon, afforded, rounds, afforded,
            )  # fmt: skip
        return afforded

    # ------------------------------------------------------------------ checkpoint
    def export_state(self) -> dict[str, Any]:
        """The server-side state a resumed run needs (JSON-able): the accountant's, and
        the central noise generator's (user-level DP)."""
        acc = self.accountant
        state: dict[str, Any] = {
            "history": to_lists(acc.history),
            "client_epsilon": {str(k): v for k, v in acc.client_epsilon.items()},
        }
        if self.noisy_sum is not None:
            state["noise_rng"] = self.noisy_sum.rng.bit_generator.state
        return state

    def buffers(self) -> State:
        """The server optimizer's buffers (arrays; empty for FedAvg's SGD step)."""
        return self.optimizer.state()

    def restore_state(
        self, state: dict[str, Any], completed_rounds: int, buffers: State | None = None
    ) -> None:
        self.accountant.history = from_lists(**state["history"])
        self.accountant.client_epsilon = {
            int(k): float(v) for k, v in state["client_epsilon"].items()
        }
        if self.noisy_sum is not None:
            self.noisy_sum.rng.bit_generator.state = state["noise_rng"]
        self.optimizer.load(buffers or {})
        self.round_offset = completed_rounds

    # ------------------------------------------------------------------ train
    def train(self, server_round: int, replies: list[Reply]) -> State | None:
        """This round's new global adapters from the replies, or None (the global
        adapters stay) when no update is valid or the aggregate is not finite."""
        stats = self.stats[server_round]
        replies = sorted(replies, key=lambda r: self.partitions.get(r.node, 0))
        self._reject_silent(stats, {r.node for r in replies})
        updates = [u for r in replies if (u := self.accept(r, stats)) is not None]
        if not updates:
            log.warning("round %d: no valid update; the global adapters stay", server_round)
            return None
        step = stages.RoundInput(server_round, self.global_state, updates, list(self.partitions))
        for stage in self.stages.round:  # observers, the combiner, the server step
            stage(step)
        new_state = step.aggregate
        assert new_state is not None, "a round stage combines the updates"
        if step.audit:
            stats.audit = step.audit
        if not all(np.isfinite(v).all() for v in new_state.values()):
            # the last line of defence: whatever the aggregator or the server step made
            # of accepted updates, a non-finite global model is never installed
            log.warning(
                "round %d: the aggregate is not finite; the global adapters stay", server_round
            )
            stats.rejected.append({"client": -1, "node": -1, "reason": "non-finite aggregate"})
            return None
        self.final = new_state
        stats.epsilon = self.accountant.step()
        return new_state

    def accept(self, reply: Reply, stats: RoundStats) -> ClientUpdate | None:
        """Validate one reply; a bad one is recorded with its reason and left out."""
        node = reply.node
        if reply.error is not None or reply.content is None:
            self._reject(stats, node, f"client error: {reply.error}")
            return None
        if node not in self.sent:
            self._reject(stats, node, "a reply from a node that was sent no instruction")
            return None
        sent_bytes = traffic.record_bytes(reply.content)
        stats.uplink_bytes += sent_bytes
        most = self.cfg.train.local_steps * self.cfg.train.batch_size  # examples a round sees
        try:
            res = wire.decode_train_res(reply.content, self.sent[node], most)
        except wire.UpdateRejected as err:
            self._reject(stats, node, str(err))
            return None
        _count_compression(stats, res, reply.content, sent_bytes)
        client_id = self.partitions.get(node, -1)
        try:
            for stage in self.stages.reply:  # norm gate, central re-clip
                res = stage(res)
        except wire.UpdateRejected as err:
            self._reject(stats, node, str(err))
            return None
        if res.epsilon is not None:
            self.accountant.client_epsilon[client_id] = res.epsilon
        if self.ledger is not None:
            self.ledger.merged(node)  # it merged what it got
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
        stats.timing[client_id] = _timing(res)
        return ClientUpdate(client_id, res.update, res.num_examples, sent=self.sent[node])

    def _reject_silent(self, stats: RoundStats, replied: set[int]) -> None:
        for node in sorted(set(self.sent) - replied):
            self._reject(stats, node, f"no reply within {self.cfg.federation.timeout:g} s")

    def _reject(self, stats: RoundStats, node: int, reason: str) -> None:
        if self.stages.downlink is not None:
            self.stages.downlink.forget(node)  # the next message is fp32
        self.holding.discard(node)  # its next message carries the structure again
        client_id = self.partitions.get(node, -1)
        log.warning("rejected the update of client %d (node %d): %s", client_id, node, reason)
        stats.rejected.append({"client": client_id, "node": node, "reason": reason})

    # ------------------------------------------------------------------ evaluate
    def evaluation(self, server_round: int, replies: list[Reply]) -> dict[str, float] | None:
        """The example-weighted mean of the clients' own evaluations (None: none valid)."""
        stats = self.stats[server_round]
        totals: dict[str, float] = {}
        count = 0
        for reply in replies:
            if reply.error is not None or reply.content is None:
                self._reject(stats, reply.node, f"evaluation failed: {reply.error}")
                continue
            stats.uplink_bytes += traffic.record_bytes(reply.content)
            try:
                n, metrics = wire.decode_eval_res(reply.content)
            except wire.UpdateRejected as err:
                self._reject(stats, reply.node, str(err))
                continue
            count += n
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * n
        if count == 0:
            return None
        stats.client_eval = {k: v / count for k, v in totals.items()}
        return stats.client_eval


def _stage(found: Sequence[object], kind: type[T]) -> T | None:
    """The stage of ``kind`` in ``found``, or None."""
    return next((s for s in found if isinstance(s, kind)), None)
