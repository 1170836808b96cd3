"""Server checkpoints: what ``fedpeft simulate --resume`` needs to continue a run exactly.

After every round the server writes ``DIR/checkpoint.npz``: the round, the global
adapters, the server's strategy state (the user-level accountant's history, the ε the
clients reported, the central noise generator's state), the server optimizer's buffers
(FedAvgM's velocity, FedAdam's moments) and the run's initial metrics, with the
resolved config. The file is written under a temporary name, fsynced, and
renamed over the previous one, so a crash mid-write leaves the previous checkpoint
intact. Partition sampling and client seeds are functions of (seed, round), so they need
no state.

Client-side state is not in the server's checkpoint: error-feedback residuals, the
downlink views and the record-level and local accountants live on the nodes, and a
simulation's nodes restart with nothing. :func:`resume_problem` refuses those runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import Config, ConfigError
from fedpeft.wire import State

FILE = "checkpoint.npz"
_META = "__meta__"


@dataclass(frozen=True)
class Checkpoint:
    round: int
    config: dict[str, Any]
    global_state: State
    strategy: dict[str, Any] = field(default_factory=dict)  # JSON-able server state
    initial: dict[str, float] = field(default_factory=dict)  # round-0 metrics
    buffers: State = field(default_factory=dict)  # the server optimizer's


def save_checkpoint(out_dir: Path, ckpt: Checkpoint) -> None:
    keys, buffer_keys = sorted(ckpt.global_state), sorted(ckpt.buffers)
    meta = {
        "round": ckpt.round,
        "config": ckpt.config,
        "strategy": ckpt.strategy,
        "initial": ckpt.initial,
        "keys": keys,
        "buffer_keys": buffer_keys,
    }
    arrays = {f"a{i}": ckpt.global_state[k] for i, k in enumerate(keys)}
    arrays |= {f"b{i}": ckpt.buffers[k] for i, k in enumerate(buffer_keys)}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{FILE}.", suffix=".npz")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out_dir / FILE)


def load_checkpoint(out_dir: Path) -> Checkpoint:
    path = out_dir / FILE
    if not path.is_file():
        raise ConfigError(f"No checkpoint in '{out_dir}' to resume from ({FILE} is missing).")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data[_META]).decode())
            state = {k: np.asarray(data[f"a{i}"]) for i, k in enumerate(meta["keys"])}
            keys = meta.get("buffer_keys", [])  # none before the server optimizers
            buffers = {k: np.asarray(data[f"b{i}"]) for i, k in enumerate(keys)}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ConfigError(f"The checkpoint '{path}' cannot be read ({err}).") from err
    return Checkpoint(
        round=int(meta["round"]),
        config=meta["config"],
        global_state=state,
        strategy=meta["strategy"],
        initial=meta["initial"],
        buffers=buffers,
    )


def resume_problem(cfg: Config, ckpt: Checkpoint) -> str | None:
    """Why this run cannot continue from ``ckpt`` exactly, or None. Only the number of
    rounds may differ from the checkpointed config."""
    from fedpeft.stages import build  # the stages name the state they keep

    nodes = max(1, cfg.partition.num_clients)  # the server's stages exist for some nodes
    lost = build(cfg, nodes).resume_problem()
    if lost is not None:
        return lost
    checkpointed_rounds = ckpt.config.get("federation", {}).get("rounds")
    if (
        cfg.privacy.mode == "user"  # the noise was computed for the checkpoint's rounds
        and cfg.privacy.noise_multiplier is None
        and cfg.federation.rounds != checkpointed_rounds
    ):
        return (
            f"the noise multiplier was computed to spend ε over {checkpointed_rounds} rounds; "
            "keep 'federation.rounds' or set 'privacy.noise_multiplier'"
        )
    ours, theirs = _without_rounds(json.loads(cfg.to_json())), _without_rounds(ckpt.config)
    changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if changed:
        return f"the config differs from the checkpoint's in: {', '.join(changed)}"
    return None


def _without_rounds(config: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(config))
    out.get("federation", {}).pop("rounds", None)
    return dict(out)
