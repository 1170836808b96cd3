"""The ``fedpeft`` command.

    fedpeft simulate CONFIG [--set key=value ...] [--out DIR] [--verbose] [--resume]
    fedpeft plan CONFIG [--set key=value ...] [--measure]
    fedpeft audit CONFIG [--set key=value ...] [--out DIR]
    fedpeft credentials DIR [--nodes N] [--host NAME ...] [--force]
    fedpeft generate DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P]
    fedpeft node --socket PATH [--node-config "k=v ..."] [--max-frame-mb N] [--release-after S]

A user mistake (config, data, model) ends in one sentence on stderr and exit code 2,
never a traceback. Ctrl-C stops a run within seconds, with exit code 130, keeping what the
last finished round wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fedpeft.threads import keep_driver_niceness


def quiet_flower_env() -> None:
    """No telemetry, update checks or runtime installs: this must run offline. Flower
    reads these when it is imported, so this runs before anything imports flwr."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # inherited by Ray workers
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    keep_driver_niceness()  # client actors at this process's niceness, not 15 above it


quiet_flower_env()

from fedpeft.config import Config, ConfigError, load_config  # noqa: E402
from fedpeft.errors import DataError, ModelError  # noqa: E402

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

USER_ERRORS = (ConfigError, DataError, ModelError)
log = logging.getLogger("fedpeft")


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fedpeft | %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    for noisy in ("transformers", "peft", "datasets", "ray"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not verbose:  # deprecation chatter of transformers/ray, not the user's concern
        warnings.filterwarnings("ignore", category=FutureWarning)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_ray_cluster(address: str) -> None:
    """A cluster address nothing answers at fails here: Flower's simulation would wait
    for its virtual clients forever. (``auto`` is left to Ray to resolve.)"""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"No Ray cluster answers at '{address}' ({err}); start one with "
            "`ray start --head` or unset 'simulation.ray_address'."
        ) from err


def preflight(cfg: Config) -> None:
    """Load data, partitions, tokenizer, model and fleet plan once in this process before
    Ray starts, so that every user mistake fails here in one sentence (and the server
    reuses what was loaded)."""
    from fedpeft.data import client_rows, load_dataset
    from fedpeft.models import build_peft_model, load_base_config, load_tokenizer
    from fedpeft.planning import plan_clients

    if cfg.simulation.ray_address:
        check_ray_cluster(cfg.simulation.ray_address)
    elif cfg.simulation.client_cpus > available_cpus():
        raise ConfigError(
            f"'simulation.client_cpus' ({cfg.simulation.client_cpus:g}) exceeds the "
            f"{available_cpus()} CPU cores available."
        )
    from fedpeft import accel

    accel.check_devices(cfg)
    accel.check_client_gpus(cfg)
    dataset = load_dataset(cfg.data, cfg.model.task, cfg.seed)
    for pid in range(cfg.partition.num_clients):
        train, _ = client_rows(cfg.data, cfg.partition, cfg.model.task, cfg.seed, pid)
        if not train:
            raise DataError(
                f"Client {pid} gets no training example under the '{cfg.partition.scheme}' "
                "partition; use fewer clients or more data."
            )
    load_tokenizer(cfg.model.name)
    build_peft_model(
        cfg.model,
        cfg.lora,
        dataset.num_labels,
        init_seed=cfg.seed,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
    )
    base_cfg = load_base_config(cfg.model, dataset.num_labels)
    limit = getattr(base_cfg, "max_position_embeddings", None) or getattr(
        base_cfg, "n_positions", None
    )
    if limit is not None and cfg.model.max_length > limit:
        raise ConfigError(
            f"'model.max_length' ({cfg.model.max_length}) exceeds the model's {limit} positions."
        )
    plan_clients(cfg, dataset.num_labels)
    log.info(
        "data: %d train / %d held-out examples, %d labels, %d clients (%s)",
        len(dataset.train), len(dataset.test), dataset.num_labels,
        cfg.partition.num_clients, cfg.partition.scheme,
    )  # fmt: skip


def backend_config(cfg: Config) -> dict[str, Any]:
    """Flower's Ray backend: a private Ray instance on this machine's cores, or (with
    ``simulation.ray_address``) an existing cluster, whose nodes state their own cores."""
    address = cfg.simulation.ray_address
    cluster = {"address": address} if address else {"num_cpus": available_cpus()}
    return {
        "client_resources": {
            "num_cpus": cfg.simulation.client_cpus,
            "num_gpus": cfg.simulation.client_gpus,
        },
        "init_args": {**cluster, "logging_level": "ERROR", "log_to_driver": True},
    }


# The apps' factories, by reference: loaded as Flower loads the components that
# pyproject.toml's [tool.flwr.app.components] names, so that the library never imports
# the apps it launches (server/ and clients/ import fedpeft, not the other way).
SERVER_APP = "server.app:make_server_app"
CLIENT_APP = "clients.app:make_client_app"
RAY_PLACEMENT = "clients.app:ray_placement"


def app_component(reference: str) -> Any:
    """The object ``module:attribute`` names, from the apps installed beside fedpeft."""
    from flwr.supercore.object_ref import load_app

    return load_app(reference, RuntimeError, project_dir=Path(__file__).resolve().parents[1])


def simulate(
    cfg: Config, out_dir: Path, client_app: ClientApp | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run a simulation on Flower's simulation runtime, or in this process
    (``simulation.runtime``); returns the summary.

    ``client_app`` defaults to fedpeft's ClientApp; tests pass one wrapped in a mod.
    ``resume``: continue the run in ``out_dir`` from its last checkpoint.
    """
    from flwr.simulation import run_simulation

    from fedpeft.loopback import run_loopback
    from fedpeft.serverrun import checkpoint_to_resume

    quiet_flower_env()
    # importing flwr resets its logger to DEBUG; keep its errors, drop its chatter
    # (fedpeft logs every round, rejection and its reason itself)
    logging.getLogger("flwr").setLevel(
        logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.ERROR
    )
    preflight(cfg)
    if resume:
        checkpoint_to_resume(cfg, out_dir)  # its mistakes end here, in one sentence
    if client_app is None:
        # on a cluster, a client mod makes each reply say which Ray node ran it
        mods = [app_component(RAY_PLACEMENT)] if cfg.simulation.ray_address else []
        client_app = app_component(CLIENT_APP)(mods)
    started = time.time()
    server_app = app_component(SERVER_APP)(cfg, out_dir, resume)
    nodes = cfg.partition.num_clients
    if cfg.simulation.runtime == "inprocess":
        log.info("%d clients in this process, one message at a time", nodes)
        run_loopback(server_app, client_app, nodes, cfg.simulation.client_cpus)
    else:
        log.info(
            "starting Flower's simulation runtime: %d virtual clients on Ray (the first "
            "round waits for its actors to load the model)", nodes,
        )  # fmt: skip
        with quiet_interrupt():
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=nodes,
                backend_config=backend_config(cfg),
            )
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError("The simulation ended without writing its summary; see the log above.")
    import json

    summary: dict[str, Any] = json.loads(summary_path.read_text())
    for node, entry in summary.get("ray_nodes", {}).items():
        log.info(
            "Ray node %s (%s): %d client rounds, clients %s",
            node[:12], entry["host"], entry["client_rounds"], entry["clients"],
        )  # fmt: skip
    log.info("done in %.0f s; outputs in %s", time.time() - started, out_dir)
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpeft", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated simulation on one machine")
    sim.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )
    sim.add_argument("--out", help="output directory (default: outputs/<config name>)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own log")
    sim.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    sim.add_argument("--force", action="store_true", help="replace a run already in --out")
    plan = sub.add_parser("plan", help="per device profile: LoRA depth, ranks, size, memory")
    plan.add_argument("config", help="YAML config with a fleet section")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument(
        "--measure", action="store_true", help="also measure one real training step per plan"
    )
    creds = sub.add_parser(
        "credentials", help="a CA, the SuperLink's TLS certificate and SuperNode key pairs"
    )
    creds.add_argument("dir", help="directory to write them to")
    creds.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs (default 3)")
    creds.add_argument(
        "--host", action="append", default=[], help="a name or IP nodes dial (repeatable)"
    )
    creds.add_argument("--force", action="store_true", help="replace credentials already in DIR")
    audit = sub.add_parser("audit", help="gradient-inversion attacks against each defense")
    audit.add_argument(
        "config", help="YAML config with an audit section, e.g. configs/audit/mr.yaml"
    )
    audit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    audit.add_argument("--out", help="output directory (default: outputs/audit-<config name>)")
    audit.add_argument("--force", action="store_true", help="replace an audit already in --out")
    gen = sub.add_parser("generate", help="answer a prompt with a causal-LM run's adapter")
    gen.add_argument("dir", help="the run's output directory (simulate --out)")
    gen.add_argument("--prompt", required=True, help="the user turn to answer")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)"
    )
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's p")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--base", action="store_true", help="answer with the base model alone")
    node = sub.add_parser(
        "node", help="a warm worker beside a SuperNode: torch and the model loaded once"
    )
    node.add_argument(
        "--socket", required=True, help="its Unix socket; the SuperNode's node config names it"
    )
    node.add_argument(
        "--node-config",
        help="the SuperNode's --node-config without 'worker'; messages from another are refused",
    )
    node.add_argument(
        "--max-frame-mb",
        type=float,
        default=256.0,
        help="largest message accepted, MiB (default 256)",
    )
    node.add_argument(
        "--release-after",
        type=float,
        default=600.0,
        help="seconds a run must be quiet before another run may use the worker (default 600)",
    )
    return parser


def _node(args: argparse.Namespace) -> int:
    """``fedpeft node``: checks its arguments, then serves in the foreground."""
    from flwr.common.config import parse_config_args

    from fedpeft.node import Limits, run_worker

    if args.max_frame_mb <= 0 or args.release_after < 0:
        raise ConfigError("--max-frame-mb must be > 0 and --release-after >= 0.")
    node_config = None
    if args.node_config is not None:
        try:
            node_config = dict(parse_config_args([args.node_config]))
        except Exception as err:  # Flower raises click exceptions for a bad value
            raise ConfigError(
                f"--node-config '{args.node_config}' does not parse ({err})."
            ) from None
        if "worker" in node_config:
            raise ConfigError("--node-config is the SuperNode's, without its 'worker' key.")
    limits = Limits(max_frame=int(args.max_frame_mb * (1 << 20)), release_after=args.release_after)
    return run_worker(Path(args.socket).expanduser(), node_config, limits)


def _generate(args: argparse.Namespace) -> int:
    from fedpeft.generate import Sampling, answer, load_run_model

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    sampling.check()  # before the model loads
    cfg, model = load_run_model(Path(args.dir), use_adapter=not args.base)
    print(answer(model, cfg, args.prompt, sampling))
    return 0


def _out_dir(args: argparse.Namespace) -> Path:
    default = Path("outputs") / (
        f"audit-{Path(args.config).stem}" if args.command == "audit" else Path(args.config).stem
    )
    return Path(args.out or default)


# What marks a directory as holding a run (simulate) or an audit's results. The names are
# spelled here rather than imported (fedpeft.checkpoint.FILE, RunLog's files): those
# modules import Flower and numpy, and the CLI checks this before its slow imports.
RUN_FILES = ("metrics.jsonl", "checkpoint.npz", "summary.json")
AUDIT_FILES = ("audit.md", "audit.json")


def refuse_overwrite(out: Path, command: str, resume: bool, force: bool) -> None:
    """A run's outputs are never replaced silently: ``--resume`` continues them,
    ``--force`` replaces them, anything else is a one-sentence refusal."""
    found = [f for f in (AUDIT_FILES if command == "audit" else RUN_FILES) if (out / f).exists()]
    if not found or resume or force:
        return
    what = "a finished run" if "summary.json" in found else f"a run ({', '.join(found)})"
    hint = (
        "pass --force to replace it"
        if command == "audit"
        else "pass --resume to continue it or --force to replace it"
    )
    raise ConfigError(f"'{out}' already holds {what}; {hint}, or choose another --out.")


def make_out_dir(out: Path) -> bool:
    """Create the output directory; True when this call created it (so a run that fails
    before writing anything can remove it again)."""
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"Output directory '{out}' cannot be created ({err.strerror}).") from err
    return not existed


def remove_if_empty(out: Path) -> None:
    """A run that failed before its first output leaves no empty directory behind."""
    with contextlib.suppress(OSError):
        out.rmdir()  # only succeeds when empty


def silence_runtimes() -> None:
    """Mute Flower's and Ray's loggers: once a run is being stopped, their threads log
    the client actors' deaths as tracebacks."""
    for name in ("flwr", "ray"):
        logging.getLogger(name).disabled = True


@contextlib.contextmanager
def quiet_interrupt() -> Iterator[None]:
    """Ctrl-C mutes the runtimes before it raises KeyboardInterrupt.

    ``run_simulation``'s ``finally`` stops the Ray actors while the backend's threads
    still wait on them, and those threads log each actor's death; muting only when the
    KeyboardInterrupt reaches ``main`` left a race that a loaded machine lost. A shell's
    background job ignores SIGINT, and keeps ignoring it here.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may install a handler (tests call from others)
        return

    def interrupted(signum: int, frame: object) -> None:
        silence_runtimes()
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_now(code: int) -> NoReturn:
    """Exit at once: stop Ray's processes, flush, and skip the join of Flower's ServerApp
    thread (it blocks in ``InMemoryGrid.send_and_receive`` and would hold the exit open
    forever). What the last finished round wrote is already on disk: metrics lines are
    fsynced and checkpoints are replaced atomically."""
    silence_runtimes()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):  # exiting anyway; nothing is left to protect
            ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _credentials(args: argparse.Namespace) -> int:
    from fedpeft.deploy import write_credentials

    if args.nodes < 0:
        raise ConfigError("'--nodes' should be non-negative.")
    for path in write_credentials(Path(args.dir), args.nodes, args.host, force=args.force):
        print(path)
    return 0


def _run(args: argparse.Namespace, out: Path) -> int:
    """The verbs that load a config: plan, audit, simulate."""
    cfg = load_config(args.config, args.set)
    if args.command == "plan":
        from fedpeft.planning import format_clients, format_plan, plan_fleet

        print(format_plan(plan_fleet(cfg, measure=args.measure)))
        if cfg.fleet.profiles:
            print(format_clients(cfg))
        return 0
    if args.command == "audit":
        from fedpeft.audit.sweep import run_audit

        run_audit(cfg, out)
        print(f"audit: {out / 'audit.md'}")
        return 0
    simulate(cfg, out, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    created = False
    out = _out_dir(args) if args.command in ("simulate", "audit") else None
    try:
        if args.command == "credentials":
            return _credentials(args)
        if args.command == "generate":
            log.info("generate %s: loading", args.dir)
            return _generate(args)
        if args.command == "node":
            log.info("node: loading torch, transformers and peft")
            return _node(args)
        log.info("%s %s: loading", args.command, args.config)  # the imports take seconds
        if out is not None:
            refuse_overwrite(out, args.command, getattr(args, "resume", False), args.force)
            created = make_out_dir(out)
        return _run(args, out or Path("."))
    except USER_ERRORS as err:
        if created and out is not None:
            remove_if_empty(out)
        print(f"fedpeft: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if created and out is not None:
            remove_if_empty(out)
        finished = out is not None and (out / "checkpoint.npz").exists()
        kept = f"; {out} keeps the rounds finished so far (continue with --resume)"
        kept = kept if finished else ""
        print(f"fedpeft: interrupted{kept}.", file=sys.stderr)
        stop_now(130)


if __name__ == "__main__":
    sys.exit(main())
