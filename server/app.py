"""fedpeft ServerApp: Flower's side of a run. It asks the nodes who they are (a query
round), hands the answers to :class:`fedpeft.serverrun.ServerRun`, and runs Flower's
round loop with :class:`server.strategy.AdapterFedAvg`; everything else is plain Python
in :mod:`fedpeft.serverrun` and :mod:`fedpeft.rounds`.

``fedpeft simulate`` builds one bound to a config with :func:`make_server_app`;
``flwr run .`` uses :data:`app`, which reads the config path from the run config.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpeft import declaration, wire
from fedpeft.config import Config, load_config
from fedpeft.rounds import Reply
from fedpeft.serverrun import BurnIn, Discovery, RoundRecorder, ServerRun, discovery
from server.strategy import AdapterFedAvg, replies_of


def discover_nodes(grid: Grid, cfg: Config, wait_s: float = 120.0) -> Discovery:
    """Wait for the clients, then ask each (a ``query`` message) for its node config: the
    partition id and the device profile it declares."""
    nodes = _wait_for_nodes(grid, cfg, wait_s)
    empty = declaration.encode_profile({})
    replies = grid.send_and_receive(
        [Message(empty, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes],
        timeout=cfg.federation.timeout,
    )
    answers = {m.metadata.src_node_id: None if m.has_error() else m.content for m in replies}
    return discovery(answers, cfg.partition.num_clients)


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


def burn_in(grid: Grid, cfg: Config) -> BurnIn:
    """LoRA-SB's burn-in exchange: one ``train.burnin`` message per node, its replies."""

    def send(contents: dict[int, RecordDict]) -> list[Reply]:
        messages = [
            Message(
                content, dst_node_id=node, ttl=cfg.federation.timeout,
                message_type=f"{MessageType.TRAIN}.{wire.BURNIN}",
            )
            for node, content in contents.items()
        ]  # fmt: skip
        received = grid.send_and_receive(messages, timeout=cfg.federation.timeout)
        return replies_of(messages, received)

    return send


def _evaluate_fn(recorder: RoundRecorder) -> Any:
    """The recorder behind Flower's ``evaluate_fn(round, arrays) -> MetricRecord``."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = recorder(server_round, wire.record_to_state(arrays))
        return MetricRecord(metrics) if metrics else None  # type: ignore[arg-type]

    return evaluate


def run_federation(grid: Grid, cfg: Config, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """The whole run: discover the nodes, plan, rounds, outputs. Returns the summary.
    ``resume``: continue from ``out_dir``'s checkpoint (fedpeft.checkpoint)."""
    run = ServerRun.prepare(
        cfg, out_dir, resume, lambda: discover_nodes(grid, cfg), burn_in(grid, cfg)
    )
    if run.rounds_left:
        AdapterFedAvg(cfg, run.rounds).start(
            grid=grid,
            initial_arrays=wire.state_to_record(run.start),
            num_rounds=run.rounds_left,
            timeout=cfg.federation.timeout,
            evaluate_fn=_evaluate_fn(run.recorder),
        )
    return run.finish()


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
