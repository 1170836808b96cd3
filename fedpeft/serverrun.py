"""A run on the server, around Flower's round loop and without Flower: who takes part,
what is built before round 1, what each round records, and the run's summary.

``server/app.py`` asks the nodes who they are (a Flower query round), hands the
answers to :meth:`ServerRun.prepare`, runs Flower's ``Strategy.start`` with
:class:`RoundRecorder` as its ``evaluate_fn``, and ends with :meth:`ServerRun.finish`.
The order of a run is described in docs/architecture.md, "One run".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from fedpeft import declaration, lora_sb, sparse_ft, wire
from fedpeft.audit.tap import AuditTap
from fedpeft.checkpoint import Checkpoint, load_checkpoint, resume_problem, save_checkpoint
from fedpeft.config import Config, ConfigError, LoraConfig
from fedpeft.data import Dataset, load_dataset
from fedpeft.devices import DeviceProfile
from fedpeft.models import (
    adapter_state,
    base_weights,
    build_peft_model,
    is_head,
    load_adapter_state,
    load_tokenizer,
    merged_adapter_model,
    set_base_deltas,
)
from fedpeft.planning import FleetPlan, plan_clients
from fedpeft.report import RunLog, save_adapter
from fedpeft.rounds import Reply, RoundStats, ServerRounds
from fedpeft.train import encode, score
from fedpeft.types import State

log = logging.getLogger("fedpeft")
# the burn-in exchange (LoRA-SB, SAM): node -> message content in, the replies out
BurnIn = Callable[[dict[int, RecordDict]], list[Reply]]


# ---------------------------------------------------------------------- who takes part
@dataclass(frozen=True)
class Discovery:
    """What the query round learned: node id -> partition id, and partition id -> the
    device profile its node declared (only nodes that declare one)."""

    partitions: dict[int, int]
    profiles: dict[int, DeviceProfile]


def read_declaration(node: int, content: RecordDict) -> tuple[int, DeviceProfile | None] | None:
    """A node's declared partition id and device profile from its answer to the query,
    or ``None`` (with a warning that names the node and the reason) when the answer or
    its declaration is malformed."""
    try:
        return declaration.decode_declaration(content)
    except wire.UpdateRejected as err:
        log.warning("node %d declares a malformed device profile and takes no part: %s", node, err)
        return None


def discovery(answers: dict[int, RecordDict | None], num_clients: int) -> Discovery:
    """The partitions and declared profiles from each node's answer (``None``: the node
    did not answer). A malformed declaration leaves its node out with a warning: one
    misconfigured device must not stop the run."""
    declared: dict[int, int] = {}
    profiles: dict[int, DeviceProfile] = {}
    for node, content in sorted(answers.items()):
        if content is None:
            log.warning("node %d did not answer the query and takes no part", node)
            continue
        answer = read_declaration(node, content)
        if answer is None:
            continue
        declared[node], profile = answer
        if profile is not None:
            profiles[node] = profile
    partitions = assign_partitions(declared, num_clients)
    return Discovery(partitions, {partitions[n]: p for n, p in profiles.items() if n in partitions})


def assign_partitions(declared: dict[int, int], num_clients: int) -> dict[int, int]:
    """Node id -> partition id: a node keeps the valid id it declared (first come, by
    node id); the others take the free ids in node-id order."""
    partitions: dict[int, int] = {}
    for node, pid in sorted(declared.items()):
        if 0 <= pid < num_clients and pid not in partitions.values():
            partitions[node] = pid
    free = (p for p in range(num_clients) if p not in partitions.values())
    for node in sorted(set(declared) - set(partitions)):
        spare = next(free, None)
        if spare is None:
            log.warning(
                "node %d finds no free partition (%d clients) and takes no part", node, num_clients
            )
            continue
        partitions[node] = spare
    return dict(sorted(partitions.items()))


def trainable_partitions(
    partitions: dict[int, int], fleet: FleetPlan, min_clients: int
) -> dict[int, int]:
    """Drop the nodes whose declared profile cannot train (with a warning naming them);
    too few left ends the run in one sentence."""
    kept = {}
    for node, pid in partitions.items():
        if pid in fleet.left_out:
            log.warning("node %d (client %d) takes no part: %s", node, pid, fleet.left_out[pid])
        else:
            kept[node] = pid
    if len(kept) < min_clients:
        raise RuntimeError(
            f"Only {len(kept)} clients can train; 'federation.min_clients' is {min_clients}."
        )
    return kept


def checkpoint_to_resume(cfg: Config, out_dir: Path) -> Checkpoint:
    """The checkpoint to continue from, or a one-sentence error saying why not."""
    ckpt = load_checkpoint(out_dir)
    problem = resume_problem(cfg, ckpt)
    if problem is not None:
        raise ConfigError(f"Cannot resume the run in '{out_dir}': {problem}.")
    return ckpt


# ---------------------------------------------------------------------- each round
class RoundRecorder:
    """Flower's ``evaluate_fn``, in plain terms: evaluates the global adapters on the
    held-out data, writes the round's ``metrics.jsonl`` line and samples, saves the
    adapter and the checkpoint. Round 0 is the adapters before any training."""

    def __init__(
        self, cfg: Config, rounds: ServerRounds, run_log: RunLog, model: Any, test: Any
    ) -> None:
        self.cfg = cfg
        self.rounds = rounds
        self.run_log = run_log
        self.model = model
        self.test = test
        self.tokenizer = load_tokenizer(cfg.model.name)
        self.initial: dict[str, float] = {}
        self.samples: list[dict[str, str]] = []  # the last evaluation's generations
        self._export: Any = None  # FLoRA's export model, refilled every round

    def _evaluate(self) -> dict[str, float]:
        if not self.cfg.federation.server_eval:
            return {}
        batch = self.cfg.federation.eval_batch_size
        metrics, self.samples = score(
            self.model, self.test, self.tokenizer, self.cfg.eval, batch, self.cfg.model.task
        )
        return metrics

    def __call__(self, server_round: int, state: State) -> dict[str, float]:
        """The server's metrics for the adapters ``state`` after ``server_round`` (of
        this process: a resumed run's rounds are offset)."""
        set_base_deltas(self.model, self.rounds.base_delta)  # FLoRA's merged updates
        load_adapter_state(self.model, self.rounds.carried(state))
        began = time.perf_counter()
        metrics = self._evaluate()
        eval_seconds = round(time.perf_counter() - began, 3)
        if server_round == 0:  # before any training in this process
            if self.rounds.round_offset == 0:
                self.initial = metrics
                log.info("round 0 (initial adapters): %s", _fmt(metrics))
                self._log_samples(0)
            else:
                log.info("resumed after round %d: %s", self.rounds.round_offset, _fmt(metrics))
            return metrics
        server_round += self.rounds.round_offset
        stats = self.rounds.stats[server_round]
        record = self._record(server_round, metrics, stats, eval_seconds)
        self.run_log.log_round(record)
        self._log_samples(server_round)
        save_adapter(self._exported(), self.run_log.out_dir / "adapter")
        checkpoint = Checkpoint(
            server_round,
            self.cfg.to_dict(),
            state,
            self.rounds.export_state(),
            self.initial,
            self.rounds.buffers(),
        )
        save_checkpoint(self.run_log.out_dir, checkpoint)
        log.info(
            "round %d/%d: %s | clients %d | uplink %.2f MB | %.1f s%s",
            server_round, self.cfg.federation.rounds, _fmt(metrics), len(stats.clients),
            stats.uplink_bytes / 1e6, record["seconds"], _client_readiness(record),
        )  # fmt: skip
        return metrics

    def _record(
        self, server_round: int, metrics: dict[str, float], stats: RoundStats, eval_seconds: float
    ) -> dict[str, Any]:
        """The round's ``metrics.jsonl`` line (docs/outputs.md)."""
        cfg = self.cfg
        return {
            "round": server_round,
            **({"accuracy": None} if cfg.model.task == "classification" else {}),
            **{k: round(v, 6) for k, v in metrics.items()},
            "train_loss": stats.train_loss,
            "client_eval": stats.client_eval or None,
            "uplink_bytes": stats.uplink_bytes,
            "downlink_bytes": stats.downlink_bytes,
            **(_compression_figures(stats) if cfg.compression.density is not None else {}),
            "clients": stats.clients,
            "rejected": stats.rejected,
            "epsilon": stats.epsilon,
            **({"delta": cfg.privacy.delta} if cfg.privacy.mode != "none" else {}),
            **({"audit": stats.audit} if stats.audit else {}),
            **_client_seconds(stats),
            "server_eval_seconds": eval_seconds,
            "seconds": round(time.perf_counter() - stats.started, 3),
        }

    def _log_samples(self, server_round: int) -> None:
        self.run_log.log_samples(server_round, self.samples)
        if self.samples:  # the prompts are in samples.jsonl
            first = self.samples[0]
            log.info(
                "  sample answer: %r (reference %r)", first["generation"][:120],
                first["reference"][:120],
            )  # fmt: skip

    def _exported(self) -> Any:
        """The model whose adapter is saved: the global adapter, or with merged updates
        (FLoRA) an exact full-rank adapter of base + merged."""
        if not self.rounds.base_delta:
            return self.model
        self._export = merged_adapter_model(
            self.model,
            self.cfg.model,
            self.rounds.num_labels,
            self.rounds.base_delta,
            reuse=self._export,
        )
        return self._export


# ---------------------------------------------------------------------- the run
@dataclass
class ServerRun:
    """Everything the server built before round 1, and what it needs at the end."""

    cfg: Config
    dataset: Dataset
    fleet: FleetPlan
    rounds: ServerRounds
    recorder: RoundRecorder
    run_log: RunLog
    start: State  # the adapters round 1 (or the resumed round) starts from
    last_round: int  # the run ends after this round (a DP budget may end it early)

    @classmethod
    def prepare(
        cls,
        cfg: Config,
        out_dir: Path,
        resume: bool,
        discover: Callable[[], Discovery],
        burn_in: BurnIn | None = None,
    ) -> ServerRun:
        """Check the checkpoint to continue from (``resume``), load the data, learn who
        takes part (``discover``: the query round), plan the fleet, and build the global
        model and the round logic. Discovery comes after the data and before the plans:
        nodes may declare device profiles, and the plans, and the global adapter that
        must cover all of them, depend on who answered. LoRA-SB and sparse fine-tuning
        then fix their structure (the basis, the mask), from the nodes' gradients
        (``burn_in``: the exchange of the burn-in messages) or from the base model."""
        if resume and cfg.peft.method != "lora":
            raise ConfigError(
                f"'--resume' does not continue a 'peft.method: {cfg.peft.method}' run yet: "
                "its fixed structure is not in the checkpoint; start the run again."
            )
        ckpt = checkpoint_to_resume(cfg, out_dir) if resume else None
        run_log = RunLog(out_dir, cfg, resumed_round=ckpt.round if ckpt else 0)
        dataset = load_dataset(cfg.data, cfg.model.task, cfg.seed)
        found = discover()
        fleet = plan_clients(_carrier(cfg), dataset.num_labels, found.profiles)
        partitions = trainable_partitions(found.partitions, fleet, cfg.federation.min_clients)
        model = build_peft_model(
            cfg.model, fleet.global_lora, dataset.num_labels, init_seed=cfg.seed,
            sparse=cfg.sparse if cfg.peft.method == "sparse" else None,
        )  # fmt: skip
        test = encode(dataset.test, load_tokenizer(cfg.model.name), cfg.model.max_length)
        rounds = ServerRounds(cfg, dataset.num_labels, partitions, fleet)
        if cfg.audit.tap_every:
            rounds.tap = AuditTap(cfg, dataset.num_labels, dataset.test)
        recorder = RoundRecorder(cfg, rounds, run_log, model, test)
        start = adapter_state(model)
        if cfg.peft.method != "lora":
            start = _structured_start(rounds, burn_in, start, model)
            load_adapter_state(model, rounds.carried(start))
        if ckpt is not None:
            rounds.restore_state(ckpt.strategy, ckpt.round, ckpt.buffers)
            recorder.initial, start = ckpt.initial, ckpt.global_state
        last = rounds.affordable_rounds()
        if last <= rounds.round_offset:
            log.info(
                "the checkpoint is at round %d of %d: nothing left to run",
                rounds.round_offset,
                last,
            )
        return cls(cfg, dataset, fleet, rounds, recorder, run_log, start, last)

    @property
    def rounds_left(self) -> int:
        return max(0, self.last_round - self.rounds.round_offset)

    def finish(self) -> dict[str, Any]:
        """Write ``summary.json`` and the plots; returns the summary."""
        cfg, fleet = self.cfg, self.fleet
        summary = self.run_log.write_summary(
            {
                "initial": self.recorder.initial,
                "num_labels": self.dataset.num_labels,
                "train_examples": len(self.dataset.train),
                "test_examples": len(self.dataset.test),
                "adapter_parameters": int(sum(v.size for v in self.start.values())),
                "client_profiles": {str(p): name for p, name in fleet.profile_names.items()},
                "client_plans": {str(p): plan_summary(lo) for p, lo in fleet.client_loras.items()},
                "left_out": {str(p): reason for p, reason in fleet.left_out.items()},
                **_privacy_summary(cfg, self.rounds, self.last_round),
                **_structure_summary(self.rounds),
                **_ray_nodes(self.rounds),
            }
        )
        self.run_log.write_plots()
        return summary


def _carrier(cfg: Config) -> Config:
    """The config the fleet is planned with: LoRA-SB's B R A rides on a LoRA of scale 1."""
    if cfg.peft.method != "lora_sb":
        return cfg
    return dataclasses.replace(cfg, lora=lora_sb.carrier_lora(cfg.lora))


def _structured_start(
    rounds: ServerRounds, burn_in: BurnIn | None, start: State, model: Any
) -> State:
    """The fixed structure of a LoRA-SB or sparse run (installed in ``rounds`` and, for
    sparse, in the server's ``model``) and the exchanged start state."""
    cfg = rounds.cfg
    shapes = {k: v.shape for k, v in start.items()}
    if cfg.peft.method == "lora_sb":
        modules = lora_sb.module_names(shapes)
        if cfg.lora_sb.init == "weights":
            basis, initial_r = lora_sb.init_from_weights(
                base_weights(model, modules), rounds.global_lora.r
            )
        else:
            matrices = lora_sb.weight_shapes(shapes)
            sums = _burnin(rounds, burn_in, start, matrices, cfg.lora_sb.burnin_steps)
            eta = cfg.lora_sb.init_lr if cfg.lora_sb.init_lr is not None else cfg.train.lr
            basis, initial_r = lora_sb.init_from_scores(sums, rounds.global_lora.r, eta)
        return rounds.install_structure(basis, initial_r, start)
    sp = cfg.sparse
    modules = sparse_ft.module_names(shapes)
    sparse_shapes = sparse_ft.matrix_shapes(model, modules)
    kept = sparse_ft.kept(model, modules)
    if sp.selection == "sam":
        sums = _burnin(rounds, burn_in, start, dict(sparse_shapes), sp.burnin_steps)
        positions = sparse_ft.select("sam", kept, sparse_shapes, scores=sums)
    elif sp.selection == "magnitude":
        w0 = base_weights(model, modules)
        positions = sparse_ft.select("magnitude", kept, sparse_shapes, weights=w0)
    else:
        positions = sparse_ft.select("random", kept, sparse_shapes, seed=cfg.seed)
    sparse_ft.install_mask(model, positions)
    report = sparse_ft.density_report(sparse_shapes, kept)
    log.info(
        "sparse: %s selection, %d trained entries (density %.3g%%)",
        sp.selection, sum(kept.values()), 100 * report["overall"],
    )  # fmt: skip
    rounds.density = report
    values = {k: v for k, v in start.items() if not is_head(k)}  # SHiRA's, at zero
    return rounds.install_structure(sparse_ft.mask_to_wire(positions, sparse_shapes), values, start)


def _burnin(
    rounds: ServerRounds,
    burn_in: BurnIn | None,
    start: State,
    modules: dict[str, tuple[int, ...]],
    steps: int,
) -> State:
    """Run the burn-in on round 1's sample; the sum of its gradients per module."""
    if burn_in is None:
        raise ValueError("this run's structure needs the burn-in exchange")
    began = time.perf_counter()
    nodes = rounds.sample(1, rounds.cfg.federation.fraction_train)
    log.info("burn-in: %d nodes sum their gradients at the base model", len(nodes))
    replies = burn_in(rounds.burnin_instructions(nodes, start))
    sums = rounds.burnin_sums(replies, modules, steps)  # type: ignore[arg-type]
    stats = rounds.burnin
    log.info(
        "burn-in: %d of %d nodes answered | uplink %.3f MB | downlink %.3f MB | %.1f s",
        len(stats.clients), len(nodes), stats.uplink_bytes / 1e6, stats.downlink_bytes / 1e6,
        time.perf_counter() - began,
    )  # fmt: skip
    return sums


def _structure_summary(rounds: ServerRounds) -> dict[str, Any]:
    """LoRA-SB's basis or the sparse mask: its size and digest, the real density of a
    mask, and what the burn-in (if any) moved."""
    if rounds.structure is None:
        return {}
    stats = rounds.burnin
    return {
        "structure": {
            "method": rounds.cfg.peft.method,
            "bytes": int(sum(v.nbytes for v in rounds.structure.values())),
            "digest": rounds.structure_digest,
            **({"density": rounds.density} if rounds.density else {}),
            "burnin": {
                "clients": stats.clients,
                "rejected": stats.rejected,
                "uplink_bytes": stats.uplink_bytes,
                "downlink_bytes": stats.downlink_bytes,
            },
        }
    }


def _privacy_summary(cfg: Config, rounds: ServerRounds, rounds_run: int) -> dict[str, Any]:
    priv = cfg.privacy
    if priv.mode == "none":
        return {}
    spent = [s.epsilon for s in rounds.stats.values() if s.epsilon is not None]
    return {
        "privacy": {
            "mode": priv.mode,
            "accountant": priv.accountant,
            "epsilon": spent[-1] if spent else 0.0,
            "delta": priv.delta,
            "epsilon_budget": priv.epsilon,
            "noise_multiplier": rounds.user_noise if priv.mode == "user" else priv.noise_multiplier,
            "clip_norm": priv.clip_norm,
            "rounds_run": rounds_run,
            "epsilon_is": {
                "user": "the server's accountant over the rounds, q = sampled / clients",
                "record": "the largest ε any client reported for its DP-SGD steps so far",
                "local": "the largest ε any client reported for its local noise so far",
            }[priv.mode],
            **_canary_estimate(cfg, rounds, spent[-1] if spent else 0.0),
        }
    }


def _canary_estimate(cfg: Config, rounds: ServerRounds, spent: float) -> dict[str, Any]:
    """With ``privacy.canaries``: how visible the canary clients are in the final model."""
    if rounds.canary_audit is None or not rounds.final:
        return {}
    estimate = rounds.canary_audit.estimate(rounds.final, cfg.privacy.delta)
    log.info(
        "canary audit (%d canaries): empirical ε %.3g, lower bound %.3g; accountant ε %.3g",
        estimate["canaries"],
        estimate["empirical_epsilon"],
        estimate["epsilon_lower_bound"],
        spent,
    )
    return {"canary_audit": estimate}


def _client_seconds(stats: RoundStats) -> dict[str, Any]:
    """The slowest client's process startup (0 when its process served an earlier round),
    model-and-data-ready and training times this round, and each client's own (none under DP, where clients report no timing)."""
    if not stats.train_seconds:
        return {}
    started = stats.startup_seconds
    return {
        **({"client_startup_seconds_max": round(max(started), 3)} if started else {}),
        "client_load_seconds_max": round(max(stats.load_seconds, default=0.0), 3),
        "client_train_seconds_max": round(max(stats.train_seconds), 3),
        "client_seconds": {str(c): t for c, t in sorted(stats.timing.items()) if t},
    }


def _client_readiness(record: dict[str, Any]) -> str:
    """The round log's view of what the slowest client spent before training."""
    if "client_load_seconds_max" not in record:
        return ""
    startup = record.get("client_startup_seconds_max") or 0.0
    started = f", process start {startup:.1f} s" if startup > 0 else ""
    return f" | client ready {record['client_load_seconds_max']:.2f} s{started}"


def _compression_figures(stats: RoundStats) -> dict[str, Any]:
    return {
        "uplink_fp32_bytes": stats.uplink_fp32_bytes,
        "uplink_payload_bytes": stats.uplink_payload_bytes,
        "uplink_bound_bytes": round(stats.uplink_bound_bytes),
        "uplink_kept_values": stats.uplink_kept_values,
        "downlink_fp32_bytes": stats.downlink_fp32_bytes,
    }


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no server evaluation"


def _ray_nodes(rounds: ServerRounds) -> dict[str, Any]:
    """How the virtual clients spread over a Ray cluster's nodes, from the replies that
    said where they ran (``simulation.ray_address``), over this process's rounds."""
    nodes: dict[str, dict[str, Any]] = {}
    for stats in rounds.stats.values():
        for client_id, (node, host) in stats.placement.items():
            entry = nodes.setdefault(node, {"host": host, "client_rounds": 0, "clients": set()})
            entry["client_rounds"] += 1
            entry["clients"].add(client_id)
    if not nodes:
        return {}
    return {
        "ray_nodes": {
            node: {**entry, "clients": sorted(entry["clients"])}
            for node, entry in sorted(nodes.items())
        }
    }


def plan_summary(lora: LoraConfig) -> dict[str, Any]:
    """A client's plan as ``summary.json`` shows it: adapted layers (null: all), its
    highest rank, and the ranks per layer pattern (empty: ``r`` everywhere)."""
    layers = None if lora.layers_to_transform is None else list(lora.layers_to_transform)
    top = max(lora.rank_pattern.values(), default=lora.r)
    return {"layers": layers, "max_rank": top, "rank_pattern": dict(lora.rank_pattern)}
