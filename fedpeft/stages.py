"""A round as stages: small objects, each one transform of what a client sends or of
what the server makes of it, chosen once from the config by :func:`build`.

The pattern is pfl-research's postprocessors (each stage a hook applied in order on the
user, its counterpart in reverse on the server) and Flower's client mods (features by
wrapping): a feature is a stage in a list, not an ``if`` inside the round. :func:`build`
is the only reader of ``privacy.mode``, the compression flags and the aggregator for
the round; a rule that joins two features (user-level DP re-clips what compression
lengthened) lives in the builder beside the stages it joins.

Client stages (:class:`ClientStage`) pass an :class:`Outgoing` along, in this order
(docs/architecture.md, "One round"):

1. :class:`LocalBudget` (``local``): one more release must fit ε, before training;
2. :class:`Train`, or :class:`DPSGD` (``record``, Abadi et al. 2016);
3. :class:`Clip` to C (``user``, ``local``): Δ ← Δ · min(1, C / ‖Δ‖);
4. :class:`LocalNoise` (``local``): Δ + N(0, (σC)²);
5. :class:`Compress` (``compression.density``): ComPEFT top-k + ternary, with error
   feedback (Yadav et al. 2023; Sattler et al. 2019);
6. :class:`ReclipSent` (``user`` with compression): ternarizing can lengthen a clipped Δ;
7. :class:`RedactMetrics` (any DP): nothing data-dependent besides the protected Δ.

Server stages come in two kinds. :class:`ReplyStage` acts on one decoded reply and may
reject it with a reason (:class:`NormGate`, :class:`CentralReclip`); :class:`RoundStage`
acts on the round's accepted updates (:class:`FloraLedger`, :class:`AuditObserver`,
then one combiner, :class:`Aggregate` or :class:`NoisySum`, then :class:`ServerStep`); the
:class:`Accountant` then says the ε spent. The downlink stage :class:`DownlinkViews`
(``compression.downlink``) turns each node's instruction into the compressed change to
the view of the adapters it holds.

Every stage names the state it keeps between rounds (``keeps``: a node-state key on a
client, a checkpoint key on the server) and whether that state survives ``--resume``
(:func:`fedpeft.checkpoint.resume_problem` refuses a run whose stages keep state that
does not). The audit (:mod:`fedpeft.audit.threat`) runs these same lists.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from fedpeft import client, nodestate
from fedpeft.aggregation import (
    Aggregator,
    ClientUpdate,
    MergesIntoBase,
    get_aggregator,
    merge_stacks,
)
from fedpeft.aggregation.base import LORA_B, Scaling
from fedpeft.aggregation.serveropt import ServerOptimizer
from fedpeft.audit.membership import CanaryAudit
from fedpeft.compression import codec
from fedpeft.compression.compeft import ScaleRule, apply_change, downlink_change
from fedpeft.config import Config, FederationConfig, LoraConfig, PrivacyConfig
from fedpeft.privacy.accounting import Entry, add_steps, epsilon, noise_multiplier
from fedpeft.privacy.mechanisms import clip, dp_fedavg, gaussian_noise, global_norm
from fedpeft.train import Encoded
from fedpeft.types import State
from fedpeft.wire import TrainIns, TrainRes, UpdateRejected


# ---------------------------------------------------------------------- client
@dataclass
class Outgoing:
    """One client round as its stages build it: the instruction, the node's merged base
    (FLoRA), the reply so far, and what the node keeps (never sent)."""

    ins: TrainIns
    cfg: Config
    base_delta: State
    kept: client.Kept
    examples: Encoded | None = None  # the audit's chosen batch instead of the partition
    rng: np.random.Generator | None = None  # local noise (default: seeded per round)
    res: TrainRes | None = None  # set by the training stage
    residual: State = field(default_factory=dict)  # the new error-feedback residual

    @property
    def reply(self) -> TrainRes:
        assert self.res is not None, "a stage before training read the reply"
        return self.res


class ClientStage:
    """One transform of a client's round. Contract: ``__call__`` takes the round so far
    and returns it, changing only what the stage owns. ``keeps``: the node-state key
    (:mod:`fedpeft.nodestate`) of what it carries between rounds, or None."""

    keeps: ClassVar[str | None] = None
    # why ``--resume`` cannot continue it exactly (its state lives on the nodes, and a
    # simulation's nodes restart empty), or None
    lost_on_resume: ClassVar[str | None] = None

    def __call__(self, out: Outgoing) -> Outgoing:
        raise NotImplementedError

    def resume_loss(self) -> str | None:
        return self.lost_on_resume


class LocalBudget(ClientStage):
    """Local DP: the node's accountant after one more release, or
    :class:`fedpeft.client.BudgetSpent` before any training is spent on it."""

    keeps = nodestate.HISTORY
    lost_on_resume = "the 'local' accountants live on the nodes"

    def __call__(self, out: Outgoing) -> Outgoing:
        history = client.local_step(out.cfg, out.kept.history)
        return dataclasses.replace(out, kept=dataclasses.replace(out.kept, history=history))


class Train(ClientStage):
    """Local training from the received adapters; the reply's Δ = after − received."""

    def __call__(self, out: Outgoing) -> Outgoing:
        res, _ = client.train_round(out.ins, out.base_delta, None, out.examples)
        return dataclasses.replace(out, res=res)


class DPSGD(ClientStage):
    """Record-level DP: DP-SGD through Opacus, its accountant kept on the node."""

    keeps = nodestate.HISTORY
    lost_on_resume = "the 'record' accountants live on the nodes"

    def __call__(self, out: Outgoing) -> Outgoing:
        res, history = client.train_round(
            out.ins, out.base_delta, out.kept.history, out.examples, dp_sgd=True
        )
        kept = dataclasses.replace(out.kept, history=history)
        return dataclasses.replace(out, res=res, kept=kept)


@dataclass(frozen=True)
class Clip(ClientStage):
    """Δ ← Δ · min(1, C / ‖Δ‖₂): the bound every DP guarantee here rests on."""

    clip_norm: float

    def __call__(self, out: Outgoing) -> Outgoing:
        update, _ = clip(out.reply.update, self.clip_norm)
        return dataclasses.replace(out, res=dataclasses.replace(out.reply, update=update))


@dataclass(frozen=True)
class LocalNoise(ClientStage):
    """Local DP: Δ + N(0, (σC)²) per coordinate, σ from :func:`fedpeft.client.local_noise`,
    the generator seeded per (round, client) with ``privacy.noise_seed``."""

    clip_norm: float

    def __call__(self, out: Outgoing) -> Outgoing:
        rng = out.rng or np.random.default_rng(client.noise_seed(out.cfg, out.ins))
        std = client.local_noise(out.cfg) * self.clip_norm
        update = gaussian_noise(out.reply.update, std, rng)
        return dataclasses.replace(out, res=dataclasses.replace(out.reply, update=update))


@dataclass(frozen=True)
class Compress(ClientStage):
    """ComPEFT compression of Δ plus the residual; ``update`` becomes what is sent.
    With error feedback the node keeps the residual; without, nothing."""

    error_feedback: bool
    keeps = nodestate.RESIDUAL
    lost_on_resume = "error-feedback residuals live on the nodes"

    def resume_loss(self) -> str | None:
        return self.lost_on_resume if self.error_feedback else None

    def __call__(self, out: Outgoing) -> Outgoing:
        res, residual = client.compress_update(out.reply, out.cfg, out.kept.residual)
        return dataclasses.replace(out, res=res, residual=residual)


@dataclass(frozen=True)
class ReclipSent(ClientStage):
    """User-level DP with compression: what is sent has norm ≤ C again."""

    clip_norm: float

    def __call__(self, out: Outgoing) -> Outgoing:
        if out.reply.compressed is None:
            return out
        res, residual = client.reclip_sent(out.reply, out.residual, self.clip_norm)
        return dataclasses.replace(out, res=res, residual=residual)


class RedactMetrics(ClientStage):
    """Any DP mode: a fixed example weight, no loss or timing, this node's ε so far."""

    def __call__(self, out: Outgoing) -> Outgoing:
        res = client.private_metrics(out.reply, out.cfg, out.kept.history)
        return dataclasses.replace(out, res=res)


def client_round(
    ins: TrainIns,
    base_delta: State,
    kept: client.Kept,
    rng: np.random.Generator | None = None,
    examples: Encoded | None = None,
) -> tuple[TrainRes, client.Kept]:
    """One client round: the config's client stages in order; returns the reply and
    what the node keeps for the next round."""
    cfg = client.parse_config(ins.config_json)
    out = Outgoing(ins, cfg, base_delta, kept, examples=examples, rng=rng)
    for stage in build(cfg).client:
        out = stage(out)
    return out.reply, client.Kept(residual=out.residual, history=out.kept.history)


# ---------------------------------------------------------------------- server
class ReplyStage:
    """One transform of a decoded reply on the server, in order; raises
    :class:`fedpeft.wire.UpdateRejected` with the reason to leave the reply out."""

    keeps: ClassVar[str | None] = None

    def __call__(self, res: TrainRes) -> TrainRes:
        raise NotImplementedError


@dataclass(frozen=True)
class NormGate(ReplyStage):
    """``federation.max_update_norm``: an update longer than the bound is rejected."""

    bound: float

    def __call__(self, res: TrainRes) -> TrainRes:
        norm = global_norm(res.update)
        if norm > self.bound:
            raise UpdateRejected(f"update norm {norm:.4g} exceeds max_update_norm {self.bound:g}")
        return res


@dataclass(frozen=True)
class CentralReclip(ReplyStage):
    """User-level DP: the server clips every update to C again, so that a client that
    did not clip (or whose compression lengthened it) cannot exceed its share of
    DP-FedAvg's sensitivity."""

    clip_norm: float

    def __call__(self, res: TrainRes) -> TrainRes:
        return dataclasses.replace(res, update=clip(res.update, self.clip_norm)[0])


@dataclass
class RoundInput:
    """What a round stage sees: the round, the adapters its instructions were cut from,
    the accepted updates (partition order) and every taking-part node; and what stages
    wrote: the audit observer's scores (they go into the round's record) and the
    aggregate (the combiner's, then the server step's: the new global adapters)."""

    server_round: int
    global_state: State
    updates: list[ClientUpdate]
    nodes: Sequence[int]
    audit: dict[str, dict[str, float]] = field(default_factory=dict)
    aggregate: State | None = None


class Tap(Protocol):
    """The gradient-inversion tap (:class:`fedpeft.audit.tap.AuditTap`)."""

    def due(self, server_round: int) -> bool: ...

    def __call__(
        self, server_round: int, updates: list[tuple[ClientUpdate, LoraConfig]]
    ) -> dict[str, dict[str, float]]: ...


class RoundStage:
    """A step over the round's accepted updates, in order: observers read the round, the
    combiner writes ``step.aggregate`` and the server step moves it. ``keeps``: the state
    it owns between rounds (its key in ``checkpoint.npz`` when it is checkpointed), or None."""

    keeps: ClassVar[str | None] = None
    lost_on_resume: ClassVar[str | None] = None  # as for a client stage

    def __call__(self, step: RoundInput) -> None:
        raise NotImplementedError

    def resume_loss(self) -> str | None:
        return self.lost_on_resume


class FloraLedger(RoundStage):
    """FLoRA (Wang et al. 2024): each round's stacked update W += η_s ΔW_t, kept until
    every node has merged it into its base, and Σ of the merged updates for the
    evaluator. The server step's η_s is folded into B here: FLoRA's update goes into the
    frozen base, which :class:`ServerStep` never sees."""

    keeps = "stacks"
    lost_on_resume = "FLoRA's merged updates live on the nodes"

    def __init__(self, aggregator: MergesIntoBase, scaling: Scaling, server_lr: float) -> None:
        self.aggregator, self.scaling, self.server_lr = aggregator, scaling, server_lr
        self.stacks: dict[int, State] = {}
        self.merged_round: dict[int, int] = {}  # node id -> last round it has merged
        self._merges_sent: dict[int, int] = {}  # node id -> last round in its message
        self.base_delta: State = {}  # module -> Σ of merged ΔW

    def unmerged(self, node: int) -> dict[int, State]:
        """The stacked updates ``node`` has not merged yet; remembers they were sent."""
        done = self.merged_round.get(node, 0)
        merges = {t: stack for t, stack in sorted(self.stacks.items()) if t > done}
        self._merges_sent[node] = max(merges, default=done)
        return merges

    def merged(self, node: int) -> None:
        """``node`` replied: it merged what its message carried."""
        self.merged_round[node] = self._merges_sent.get(node, 0)

    def __call__(self, step: RoundInput) -> None:
        stack = self.aggregator.stack(step.global_state, step.updates, self.scaling)
        eta = np.float32(self.server_lr)
        stack = {k: v * eta if LORA_B in k else v for k, v in stack.items()}
        self.stacks[step.server_round] = stack
        self.base_delta = merge_stacks(self.base_delta, [stack])
        everyone = min((self.merged_round.get(n, 0) for n in step.nodes), default=0)
        self.stacks = {t: st for t, st in self.stacks.items() if t > everyone}


class AuditObserver(RoundStage):
    """``audit.tap_every``: the gradient-inversion tap (:mod:`fedpeft.audit.tap`) sees
    the accepted updates as aggregation does; its scores go into the round's record.
    The server attaches the tap, which needs the held-out data."""

    def __init__(self, client_loras: dict[int, LoraConfig]) -> None:
        self.client_loras = client_loras
        self.tap: Tap | None = None

    def __call__(self, step: RoundInput) -> None:
        if self.tap is not None and self.tap.due(step.server_round):
            pairs = [(u, self.client_loras[u.client_id]) for u in step.updates]
            step.audit = self.tap(step.server_round, pairs)


@dataclass(frozen=True)
class Aggregate(RoundStage):
    """The configured aggregator (``federation.aggregator``)."""

    aggregator: Aggregator
    scaling: Scaling

    def __call__(self, step: RoundInput) -> None:
        step.aggregate = self.aggregator.aggregate(step.global_state, step.updates, self.scaling)


class NoisySum(RoundStage):
    """DP-FedAvg (McMahan et al. 2018, Alg. 1): x + (Σ Δ̃_k + N(0, (zC)²)) / m over the
    m sampled, canary clients (``privacy.canaries``) counted among them; the server step
    then scales the step by η_s (post-processing: ε is unchanged). Its noise generator is
    checkpointed; the canaries compare against the run's first adapters."""

    keeps = "noise_rng"

    def __init__(
        self, priv: PrivacyConfig, noise: float, sampled: int, q: float, seed: int
    ) -> None:
        self.priv, self.noise, self.sampled, self.q, self.seed = priv, noise, sampled, q, seed
        self.rng = np.random.default_rng(priv.noise_seed)
        self.canary_audit: CanaryAudit | None = None

    def _canaries(self, initial: State) -> list[State]:
        if not self.priv.canaries:
            return []
        if self.canary_audit is None:  # the adapters of round 1 are θ_0
            self.canary_audit = CanaryAudit(
                initial, self.priv.canaries, self.priv.clip_norm, self.q, seed=self.seed + 7919
            )
        return self.canary_audit.this_round()

    def resume_loss(self) -> str | None:
        if self.priv.canaries:
            return "the canary audit compares against the run's first adapters"
        return None

    def __call__(self, step: RoundInput) -> None:
        canaries = self._canaries(step.global_state)
        step.aggregate = dp_fedavg(
            step.global_state,
            [u.delta for u in step.updates] + canaries,
            self.priv.clip_norm,
            self.noise,
            self.sampled + len(canaries),
            self.rng,
        )


class ServerStep(RoundStage):
    """The server optimizer's step on the pseudo-gradient aggregate − x, whichever
    combiner made the aggregate (:mod:`fedpeft.aggregation.serveropt`: FedAvg's
    x + η_s Δ, FedAvgM, FedAdam). ``keeps``: the momentum buffers, in the checkpoint."""

    keeps = "server_optimizer"

    def __init__(self, optimizer: ServerOptimizer) -> None:
        self.optimizer = optimizer

    def __call__(self, step: RoundInput) -> None:
        assert step.aggregate is not None, "the server step follows a combiner"
        step.aggregate = self.optimizer.step(step.global_state, step.aggregate)


class Accountant:
    """ε after a round. ``user``: the server's accountant steps once at (z, q);
    ``record``/``local``: the largest ε any client has reported (their accountants live
    on the nodes); no DP: none."""

    keeps = "history"

    def __init__(self, priv: PrivacyConfig, noise: float, q: float) -> None:
        self.priv, self.noise, self.q = priv, noise, q
        self.history: list[Entry] = []
        self.client_epsilon: dict[int, float] = {}

    def step(self) -> float | None:
        priv = self.priv
        if priv.mode == "user":
            self.history = add_steps(self.history, self.noise, self.q, 1)
            return epsilon(self.history, priv.delta, priv.accountant)
        if priv.mode != "none":
            return max(self.client_epsilon.values(), default=0.0)
        return None


# ---------------------------------------------------------------------- downlink
class DownlinkViews:
    """ComPEFT's downlink (Yadav et al. 2023): a node that holds a view of the global
    adapters is sent only the change to them, top-k sparsified and ternarized
    (:func:`fedpeft.compression.compeft.downlink_change`), and the server mirrors the
    view the node then holds, bit for bit. What is not sent now stays in the next
    change (error feedback by construction). A node without a view (its first message,
    or after a rejected reply, when its view is unknown) gets the fp32 adapters."""

    lost_on_resume: ClassVar[str] = "downlink views live on the nodes"

    def __init__(self, density: float, scale: ScaleRule, alpha: float) -> None:
        self.density, self.scale, self.alpha = density, scale, alpha
        self.views: dict[int, State] = {}  # node id -> the adapters it holds
        self.numbers: dict[int, int] = {}  # node id -> that view's number

    def __call__(self, node: int, ins: TrainIns) -> tuple[TrainIns, State]:
        """The instruction to send ``node`` instead of ``ins``, and the adapters the
        node holds once it has applied it."""
        number = self.numbers.get(node, -1) + 1
        self.numbers[node] = number
        if node not in self.views:
            self.views[node] = ins.adapters
            return dataclasses.replace(ins, view=number), ins.adapters
        change = downlink_change(
            ins.adapters, self.views[node], self.density, self.scale, self.alpha
        )
        self.views[node] = apply_change(self.views[node], change)
        packed = codec.pack(change)
        sent = dataclasses.replace(
            ins, adapters={}, downlink=packed, base_view=number - 1, view=number
        )
        return sent, self.views[node]

    def forget(self, node: int) -> None:
        """``node``'s reply was rejected: what it holds is unknown now."""
        self.views.pop(node, None)

    def resume_loss(self) -> str:
        return self.lost_on_resume


@dataclass(frozen=True)
class Stages:
    """The round's stages for one config. The server's (``reply``, ``round``, the
    accountant) exist only when built for a number of nodes."""

    client: Sequence[ClientStage]
    reply: Sequence[ReplyStage] = ()
    round: Sequence[RoundStage] = ()
    accountant: Accountant | None = None
    aggregator: Aggregator | None = None  # also cuts each node's view of the adapters
    downlink: DownlinkViews | None = None  # compressed changes to each node's view

    def resume_problem(self) -> str | None:
        """Why ``--resume`` cannot continue a run of these stages exactly: the first
        stage whose state does not survive it, or None."""
        downlink = [self.downlink] if self.downlink is not None else []
        kept: list[ClientStage | RoundStage | DownlinkViews] = [*self.client, *self.round]
        reasons = (s.resume_loss() for s in [*kept, *downlink])
        return next((r for r in reasons if r is not None), None)


def client_stages(cfg: Config) -> list[ClientStage]:
    """The client's stages ``cfg`` asks for, in order."""
    priv, mode = cfg.privacy, cfg.privacy.mode
    stages: list[ClientStage] = []
    if mode == "local":
        stages.append(LocalBudget())
    stages.append(DPSGD() if mode == "record" else Train())
    if mode in ("user", "local"):
        stages.append(Clip(priv.clip_norm))
    if mode == "local":
        stages.append(LocalNoise(priv.clip_norm))
    if cfg.compression.density is not None:
        stages.append(Compress(cfg.compression.error_feedback))
        # under local DP the noise is already on: clipping a noised update would only
        # shrink its signal, so only user-level DP re-clips what compression lengthened
        if mode == "user":
            stages.append(ReclipSent(priv.clip_norm))
    if mode != "none":
        stages.append(RedactMetrics())
    return stages


def reply_stages(cfg: Config) -> list[ReplyStage]:
    """What the server does to each decoded reply, in order."""
    stages: list[ReplyStage] = []
    if cfg.federation.max_update_norm is not None:
        stages.append(NormGate(cfg.federation.max_update_norm))
    if cfg.privacy.mode == "user":
        stages.append(CentralReclip(cfg.privacy.clip_norm))
    return stages


def user_noise(cfg: Config, num_nodes: int) -> float:
    """z of DP-FedAvg: configured, or what spends ε over the configured rounds at
    q = sampled / nodes."""
    priv, fed = cfg.privacy, cfg.federation
    q = fed.sampled(num_nodes) / num_nodes
    return _noise(priv.noise_multiplier, priv.epsilon, priv.delta, q, fed.rounds, priv.accountant)


# the search for z can take seconds (minutes with the PRV accountant); the checkpoint
# check and the server build the same stages
_noise = functools.lru_cache(maxsize=8)(noise_multiplier)


def server_optimizer(fed: FederationConfig) -> ServerOptimizer:
    """``federation.server_optimizer`` with its learning rate and moments."""
    return ServerOptimizer(
        fed.server_optimizer, fed.server_lr, fed.server_momentum, fed.server_beta2, fed.server_tau
    )


def build(
    cfg: Config, num_nodes: int = 0, client_loras: dict[int, LoraConfig] | None = None
) -> Stages:
    """The stages ``cfg`` asks for: the client's alone, or (``num_nodes`` > 0, the nodes
    taking part, with each partition's LoRA plan) the server's as well."""
    clients = client_stages(cfg)
    if num_nodes == 0:
        return Stages(clients)
    priv, fed, comp = cfg.privacy, cfg.federation, cfg.compression
    sampled = fed.sampled(num_nodes)
    q = sampled / num_nodes
    noise = user_noise(cfg, num_nodes) if priv.mode == "user" else 0.0
    scaling = cfg.lora.scaling_for
    aggregator = get_aggregator(fed.aggregator)
    rounds: list[RoundStage] = []
    if isinstance(aggregator, MergesIntoBase):
        rounds.append(FloraLedger(aggregator, scaling, fed.server_lr))
    if cfg.audit.tap_every:
        rounds.append(AuditObserver(client_loras or {}))
    # user-level DP replaces the aggregator by the noisy sum (config validation refuses
    # it with an aggregator other than fedit: DP-FedAvg needs one LoRA shape)
    if priv.mode == "user":
        rounds.append(NoisySum(priv, noise, sampled, q, cfg.seed))
    else:
        rounds.append(Aggregate(aggregator, scaling))
    rounds.append(ServerStep(server_optimizer(fed)))
    return Stages(
        clients,
        reply_stages(cfg),
        rounds,
        Accountant(priv, noise, q),
        aggregator,
        downlink=DownlinkViews(comp.density, comp.scale, comp.alpha)
        if comp.downlink and comp.density is not None
        else None,
    )
