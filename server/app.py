"""fedpeft ServerApp: build everything from the config, run Flower's round loop, write
the outputs. ``fedpeft simulate`` builds one bound to a config with
:func:`make_server_app`; ``flwr run .`` uses :data:`app`, which reads the config path
from the run config.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpeft import wire
from fedpeft.audit.tap import AuditTap
from fedpeft.checkpoint import Checkpoint, load_checkpoint, resume_problem, save_checkpoint
from fedpeft.config import Config, ConfigError, LoraConfig, load_config
from fedpeft.data import load_dataset
from fedpeft.devices import DeviceProfile
from fedpeft.models import (
    adapter_state,
    build_peft_model,
    load_adapter_state,
    load_tokenizer,
    merged_adapter_model,
    set_base_deltas,
)
from fedpeft.planning import FleetPlan, plan_clients
from fedpeft.privacy.accounting import affordable_steps
from fedpeft.report import RunLog, save_adapter
from fedpeft.rounds import RoundStats
from fedpeft.train import encode, score
from server.strategy import AdapterFedAvg

log = logging.getLogger("fedpeft")


@dataclass(frozen=True)
class Discovery:
    """What the query round learned: node id -> partition id, and partition id -> the
    device profile its node declared (only nodes that declare one)."""

    partitions: dict[int, int]
    profiles: dict[int, DeviceProfile]


def discover_nodes(grid: Grid, cfg: Config, wait_s: float = 120.0) -> Discovery:
    """Wait for the clients, then ask each (a ``query`` message) for its node config: the
    partition id and the device profile it declares. A node whose declaration is
    malformed is left out with a warning: one misconfigured device must not stop the run."""
    nodes = _wait_for_nodes(grid, cfg, wait_s)
    empty = wire.encode_profile({})
    replies = grid.send_and_receive(
        [Message(empty, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes],
        timeout=cfg.federation.timeout,
    )
    declared: dict[int, int] = {}
    profiles: dict[int, DeviceProfile] = {}
    for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
        node = msg.metadata.src_node_id
        if msg.has_error():
            log.warning("node %d did not answer the query and takes no part", node)
            continue
        answer = read_declaration(node, msg.content)
        if answer is None:
            continue
        pid, profile = answer
        declared[node] = pid
        if profile is not None:
            profiles[node] = profile
    partitions = assign_partitions(declared, cfg.partition.num_clients)
    return Discovery(partitions, {partitions[n]: p for n, p in profiles.items() if n in partitions})


def read_declaration(node: int, content: RecordDict) -> tuple[int, DeviceProfile | None] | None:
    """A node's declared partition id and device profile from its answer to the query,
    or ``None`` (with a warning that names the node and the reason) when the answer or
    its declaration is malformed."""
    try:
        return wire.decode_declaration(content)
    except wire.UpdateRejected as err:
        log.warning("node %d declares a malformed device profile and takes no part: %s", node, err)
        return None


def _wait_for_nodes(grid: Grid, cfg: Config, wait_s: float) -> list[int]:
    """The connected nodes, once all ``partition.num_clients`` are there or ``wait_s`` has
    passed; fewer than ``federation.min_clients`` ends the run in one sentence."""
    deadline = time.time() + wait_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < cfg.partition.num_clients and time.time() < deadline:
        time.sleep(0.2)
        nodes = list(grid.get_node_ids())
    if len(nodes) < cfg.federation.min_clients:
        raise RuntimeError(
            f"Only {len(nodes)} clients connected within {wait_s:.0f} s; "
            f"'federation.min_clients' is {cfg.federation.min_clients}."
        )
    return nodes


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


class ServerEvaluator:
    """Evaluates the global adapters on held-out data and writes one line per round."""

    def __init__(
        self, cfg: Config, strategy: AdapterFedAvg, run_log: RunLog, model: Any, test: Any
    ) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.run_log = run_log
        self.model = model
        self.test = test
        self.tokenizer = load_tokenizer(cfg.model.name)
        self.pad_id = self.tokenizer.pad_token_id
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

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        state = wire.record_to_state(arrays)
        set_base_deltas(self.model, self.strategy.rounds.base_delta)  # FLoRA's merged updates
        load_adapter_state(self.model, state)
        began = time.perf_counter()
        metrics = self._evaluate()
        eval_seconds = round(time.perf_counter() - began, 3)
        if server_round == 0:  # before any training in this process
            if self.strategy.rounds.round_offset == 0:
                self.initial = metrics
                log.info("round 0 (initial adapters): %s", _fmt(metrics))
                self._log_samples(0)
            else:
                log.info(
                    "resumed after round %d: %s", self.strategy.rounds.round_offset, _fmt(metrics)
                )
            return MetricRecord(metrics) if metrics else None  # type: ignore[arg-type]
        server_round += self.strategy.rounds.round_offset
        stats = self.strategy.rounds.stats[server_round]
        record = {
            "round": server_round,
            **({"accuracy": None} if self.cfg.model.task == "classification" else {}),
            **{k: round(v, 6) for k, v in metrics.items()},
            "train_loss": stats.train_loss,
            "client_eval": stats.client_eval or None,
            "uplink_bytes": stats.uplink_bytes,
            "downlink_bytes": stats.downlink_bytes,
            **(_compression_figures(stats) if self.cfg.compression.density is not None else {}),
            "clients": stats.clients,
            "rejected": stats.rejected,
            "epsilon": stats.epsilon,
            **({"delta": self.cfg.privacy.delta} if self.cfg.privacy.mode != "none" else {}),
            **({"audit": stats.audit} if stats.audit else {}),
            **_client_seconds(stats),
            "server_eval_seconds": eval_seconds,
            "seconds": round(time.perf_counter() - stats.started, 3),
        }
        self.run_log.log_round(record)
        self._log_samples(server_round)
        save_adapter(self._exported(), self.run_log.out_dir / "adapter")
        checkpoint = Checkpoint(
            server_round,
            self.cfg.to_dict(),
            state,
            self.strategy.rounds.export_state(),
            self.initial,
        )
        save_checkpoint(self.run_log.out_dir, checkpoint)
        log.info(
            "round %d/%d: %s | clients %d | uplink %.2f MB | %.1f s%s",
            server_round, self.cfg.federation.rounds, _fmt(metrics), len(stats.clients),
            stats.uplink_bytes / 1e6, record["seconds"], _client_readiness(record),
        )  # fmt: skip
        return MetricRecord(metrics) if metrics else None  # type: ignore[arg-type]

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
        if not self.strategy.rounds.base_delta:
            return self.model
        self._export = merged_adapter_model(
            self.model,
            self.cfg.model,
            self.strategy.rounds.num_labels,
            self.strategy.rounds.base_delta,
            reuse=self._export,
        )
        return self._export


def affordable_rounds(cfg: Config, strategy: AdapterFedAvg) -> int:
    """User-level DP with a fixed z and a budget ε: the rounds the budget affords (ε
    depends only on z, q and the number of rounds, so this is known before round 1)."""
    priv = cfg.privacy
    if priv.mode != "user" or priv.epsilon is None or priv.noise_multiplier is None:
        return cfg.federation.rounds
    nodes = len(strategy.rounds.partitions)
    q = cfg.federation.sampled(nodes) / nodes
    rounds = affordable_steps(
        strategy.rounds.user_noise,
        q,
        priv.epsilon,
        priv.delta,
        cfg.federation.rounds,
        priv.accountant,
    )
    if rounds == 0:
        raise RuntimeError(
            f"The privacy budget ε = {priv.epsilon:g} does not afford one round at "
            f"noise multiplier {strategy.rounds.user_noise:g}; raise one of them."
        )
    if rounds < cfg.federation.rounds:
        log.warning(
            "privacy budget ε = %g affords %d of %d rounds; the run stops after round %d",
            priv.epsilon, rounds, cfg.federation.rounds, rounds,
        )  # fmt: skip
    return rounds


def _privacy_summary(cfg: Config, strategy: AdapterFedAvg, rounds: int) -> dict[str, Any]:
    priv = cfg.privacy
    if priv.mode == "none":
        return {}
    spent = [s.epsilon for s in strategy.rounds.stats.values() if s.epsilon is not None]
    return {
        "privacy": {
            "mode": priv.mode,
            "accountant": priv.accountant,
            "epsilon": spent[-1] if spent else 0.0,
            "delta": priv.delta,
            "epsilon_budget": priv.epsilon,
            "noise_multiplier": strategy.rounds.user_noise
            if priv.mode == "user"
            else priv.noise_multiplier,
            "clip_norm": priv.clip_norm,
            "rounds_run": rounds,
            "epsilon_is": {
                "user": "the server's accountant over the rounds, q = sampled / clients",
                "record": "the largest ε any client reported for its DP-SGD steps so far",
                "local": "the largest ε any client reported for its local noise so far",
            }[priv.mode],
            **_canary_estimate(cfg, strategy, spent[-1] if spent else 0.0),
        }
    }


def _canary_estimate(cfg: Config, strategy: AdapterFedAvg, spent: float) -> dict[str, Any]:
    """With ``privacy.canaries``: how visible the canary clients are in the final model."""
    if strategy.rounds.canary_audit is None or not strategy.rounds.final:
        return {}
    estimate = strategy.rounds.canary_audit.estimate(strategy.rounds.final, cfg.privacy.delta)
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
    model-and-data-ready and training times this round (none under DP, where clients
    report no timing)."""
    if not stats.train_seconds:
        return {}
    started = stats.startup_seconds
    return {
        **({"client_startup_seconds_max": round(max(started), 3)} if started else {}),
        "client_load_seconds_max": round(max(stats.load_seconds, default=0.0), 3),
        "client_train_seconds_max": round(max(stats.train_seconds), 3),
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


def run_federation(grid: Grid, cfg: Config, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """The whole run: discover the nodes, plan, rounds, outputs. Returns the summary.

    Discovery comes first because nodes may declare their device profiles: the plans,
    and the global adapter that must cover all of them, depend on who answered.
    ``resume``: continue from ``out_dir``'s checkpoint (fedpeft.checkpoint)."""
    ckpt = checkpoint_to_resume(cfg, out_dir) if resume else None
    run_log = RunLog(out_dir, cfg, resumed_round=ckpt.round if ckpt else 0)
    dataset = load_dataset(cfg.data, cfg.model.task, cfg.seed)
    found = discover_nodes(grid, cfg)
    fleet = plan_clients(cfg, dataset.num_labels, found.profiles)
    partitions = _trainable_partitions(found.partitions, fleet, cfg)
    model = build_peft_model(cfg.model, fleet.global_lora, dataset.num_labels, init_seed=cfg.seed)
    test = encode(dataset.test, load_tokenizer(cfg.model.name), cfg.model.max_length)
    strategy = AdapterFedAvg(cfg, dataset.num_labels, partitions, fleet)
    if cfg.audit.tap_every:
        strategy.rounds.tap = AuditTap(cfg, dataset.num_labels, dataset.test)
    evaluator = ServerEvaluator(cfg, strategy, run_log, model, test)
    start = adapter_state(model)
    if ckpt is not None:
        strategy.rounds.restore_state(ckpt.strategy, ckpt.round)
        evaluator.initial, start = ckpt.initial, ckpt.global_state
    rounds = affordable_rounds(cfg, strategy)
    if rounds > strategy.rounds.round_offset:
        strategy.start(
            grid=grid,
            initial_arrays=wire.state_to_record(start),
            num_rounds=rounds - strategy.rounds.round_offset,
            timeout=cfg.federation.timeout,
            evaluate_fn=evaluator,
        )
    else:
        log.info(
            "the checkpoint is at round %d of %d: nothing left to run",
            ckpt.round if ckpt else 0,
            rounds,
        )
    summary = run_log.write_summary(
        {
            "initial": evaluator.initial,
            "num_labels": dataset.num_labels,
            "train_examples": len(dataset.train),
            "test_examples": len(dataset.test),
            "adapter_parameters": int(sum(v.size for v in adapter_state(model).values())),
            "client_profiles": {str(p): name for p, name in fleet.profile_names.items()},
            "client_plans": {str(p): _plan_summary(lo) for p, lo in fleet.client_loras.items()},
            "left_out": {str(p): reason for p, reason in fleet.left_out.items()},
            **_privacy_summary(cfg, strategy, rounds),
            **_ray_nodes(strategy),
        }
    )
    run_log.write_plots()
    return summary


def _trainable_partitions(
    partitions: dict[int, int], fleet: FleetPlan, cfg: Config
) -> dict[int, int]:
    """Drop the nodes whose declared profile cannot train (with a warning naming them);
    too few left ends the run in one sentence."""
    kept = {}
    for node, pid in partitions.items():
        if pid in fleet.left_out:
            log.warning("node %d (client %d) takes no part: %s", node, pid, fleet.left_out[pid])
        else:
            kept[node] = pid
    if len(kept) < cfg.federation.min_clients:
        raise RuntimeError(
            f"Only {len(kept)} clients can train; 'federation.min_clients' is "
            f"{cfg.federation.min_clients}."
        )
    return kept


def _ray_nodes(strategy: AdapterFedAvg) -> dict[str, Any]:
    """How the virtual clients spread over a Ray cluster's nodes, from the replies that
    said where they ran (``simulation.ray_address``), over this process's rounds."""
    nodes: dict[str, dict[str, Any]] = {}
    for stats in strategy.rounds.stats.values():
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


def _plan_summary(lora: LoraConfig) -> dict[str, Any]:
    """A client's plan as ``summary.json`` shows it: adapted layers (null: all), its
    highest rank, and the ranks per layer pattern (empty: ``r`` everywhere)."""
    layers = None if lora.layers_to_transform is None else list(lora.layers_to_transform)
    top = max(lora.rank_pattern.values(), default=lora.r)
    return {"layers": layers, "max_rank": top, "rank_pattern": dict(lora.rank_pattern)}


def checkpoint_to_resume(cfg: Config, out_dir: Path) -> Checkpoint:
    """The checkpoint to continue from, or a one-sentence error saying why not."""
    ckpt = load_checkpoint(out_dir)
    problem = resume_problem(cfg, ckpt)
    if problem is not None:
        raise ConfigError(f"Cannot resume the run in '{out_dir}': {problem}.")
    return ckpt


def make_server_app(cfg: Config, out_dir: Path, resume: bool = False) -> ServerApp:
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, out_dir, resume)

    return bound


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: run config keys ``config``, ``out``, ``set`` and
    ``resume`` (true: continue the run in ``out`` from its last checkpoint)."""
    rc = context.run_config
    cfg = load_config(str(rc["config"]), shlex.split(str(rc.get("set", ""))))
    run_federation(grid, cfg, Path(str(rc["out"])), resume=bool(rc.get("resume", False)))
