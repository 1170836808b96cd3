"""Golden runs: short tiny-model federations that together pass through every stage of a
round, compared with what they wrote before the round was restructured.

Each run goes through the real ServerApp, strategy, ClientApp and client mods, in this
process (``simulation.runtime: inprocess``, :mod:`fedpeft.loopback`), and its
``metrics.jsonl`` (every key but timings) and the bytes of its final global adapters must
equal the recorded ones in ``tests/golden/``. ``test_inprocess_equals_ray`` shows that the
in-process runtime is what Flower's Ray runtime computes, so the goldens stand for both.

The goldens hold floats to the last bit, which depend on the CPU's kernels (AVX2 and
AVX512 hosts differ in the last bits, and so, through the entropy coder, by a byte in a
compressed payload): each run is recorded once per CPU capability, in
``tests/golden/NAME.CAPABILITY.json``. On a machine with no recording of its own (or
another torch version) the numbers are compared to a tolerance instead (``close``).
Re-record, after a change that is meant to change results, with::

    python tests/test_golden.py --record [NAME ...]

which deletes the other capabilities' recordings of those runs (stale now); on a host of
another capability, with the code unchanged, ``--record --keep-others`` adds its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from clients.app import make_client_app  # noqa: E402
from fedpeft import wire  # noqa: E402
from fedpeft.checkpoint import load_checkpoint  # noqa: E402
from fedpeft.cli import simulate  # noqa: E402
from fedpeft.config import config_from_dict  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
# one pytest-xdist worker runs them all: they share the fixed profile directory below
pytestmark = pytest.mark.xdist_group("golden")

BASE: dict[str, Any] = {
    "seed": 3,
    "model": {"name": "tiny-bert", "max_length": 32},
    "lora": {"r": 4},
    "data": {"synthetic_samples": 300, "synthetic_classes": 3, "test_fraction": 0.2},
    "partition": {"num_clients": 3, "scheme": "dirichlet", "alpha": 1.0},
    "train": {"local_steps": 3, "batch_size": 8, "lr": 5e-3},
    "federation": {"rounds": 2, "min_clients": 2},
    "simulation": {"runtime": "inprocess", "client_cpus": 1},
}
# Every message carries the resolved config, with absolute profile paths: the fleet runs
# read their profiles from one fixed directory, so that their downlink bytes do not
# depend on where the repository is checked out (run() copies them there).
PROFILES = Path("/tmp/fedpeft-golden-profiles")
FLEET = {
    "profiles": [str(PROFILES / "small.yaml"), str(PROFILES / "large.yaml")],
    "mix": {"small": 1, "large": 2},
    "max_rank": 8,
}
LLAMA: dict[str, Any] = {
    **BASE,
    "model": {"name": "tiny-llama", "task": "causal_lm", "max_length": 48},
    "data": {"synthetic_samples": 120, "synthetic_classes": 3, "test_fraction": 0.2},
    "partition": {"num_clients": 3, "scheme": "iid", "client_test_fraction": 0.0},
    "train": {"local_steps": 2, "batch_size": 4, "lr": 1e-2},
    "eval": {"max_new_tokens": 2, "generate_examples": 6, "samples": 1},
}


def with_sections(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """``base`` with some sections updated key by key."""
    return {**base, **{k: {**base.get(k, {}), **v} for k, v in sections.items()}}


HOSTILE = 0  # the partition whose client scales its update


# name -> config; a stage appears in at least one
RUNS: dict[str, dict[str, Any]] = {
    "fedit": with_sections(BASE, federation={"client_eval": True}),
    "flexlora_fleet": with_sections(BASE, federation={"aggregator": "flexlora"}, fleet=FLEET),
    "zero_pad_fleet": with_sections(BASE, federation={"aggregator": "zero_pad"}, fleet=FLEET),
    "rbla_fleet": with_sections(BASE, federation={"aggregator": "rbla"}, fleet=FLEET),
    "flora_fleet": with_sections(
        BASE, federation={"aggregator": "flora", "rounds": 3, "client_eval": True}, fleet=FLEET
    ),
    "compression_ef_downlink": with_sections(
        BASE, federation={"rounds": 3}, compression={"density": 0.15, "downlink": True}
    ),
    "user_dp_canaries": with_sections(
        BASE,
        federation={"rounds": 3, "fraction_train": 0.67},
        privacy={"mode": "user", "epsilon": 20.0, "clip_norm": 0.5, "noise_seed": 1, "canaries": 8},
    ),
    "local_dp": with_sections(
        BASE, privacy={"mode": "local", "noise_multiplier": 0.5, "clip_norm": 1.0, "noise_seed": 4}
    ),
    "record_dp": with_sections(
        BASE, privacy={"mode": "record", "noise_multiplier": 1.0, "clip_norm": 1.0, "noise_seed": 5}
    ),
    "hostile_median": with_sections(
        BASE,
        partition={"scheme": "iid"},
        federation={"rounds": 3, "min_clients": 3, "aggregator": "median", "max_update_norm": 1e4},
    ),
    "resume": with_sections(BASE, federation={"rounds": 3, "fraction_train": 0.67}),
    "fedavgm": with_sections(
        BASE,
        federation={
            "rounds": 3,
            "server_optimizer": "momentum",
            "server_lr": 0.5,
            "server_momentum": 0.5,
        },
    ),
    "instruction_llama": LLAMA,
    "lora_sb_ternary_downlink": with_sections(
        BASE,
        peft={"method": "lora_sb"},
        federation={"rounds": 3},
        compression={"density": 1.0, "downlink": True},
    ),
    "sparse_sam": with_sections(
        BASE, peft={"method": "sparse"}, sparse={"density": 0.05}, federation={"rounds": 3}
    ),
}


def hostile_client_app(partition: int = HOSTILE) -> Any:
    """Partition ``partition`` scales its update: ×1e5 in round 1 (beyond
    ``max_update_norm``), ×-300 afterwards (under it, outvoted by the median)."""

    def scale(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train":
            return reply
        ins = wire.decode_train_ins(msg.content)
        if ins.partition_id != partition:
            return reply
        res = wire.decode_train_res(reply.content, ins.adapters, 2**31)
        factor = 1e5 if ins.server_round == 1 else -300.0
        update = {k: (v * factor).astype(v.dtype) for k, v in res.update.items()}
        return Message(wire.encode_train_res(dataclasses.replace(res, update=update)), reply_to=msg)

    return make_client_app(mods=[scale])


def platform() -> dict[str, str]:
    """What the last bits of the floats depend on."""
    import torch

    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def adapters_digest(state: dict[str, np.ndarray]) -> str:
    """sha256 over the global adapters' names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = np.ascontiguousarray(state[key])
        digest.update(f"{key}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def outcome(out: Path) -> dict[str, Any]:
    """A run's golden: its metrics rows and summary without timings (and without the
    config, whose paths name this checkout), and its final adapters' digest."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "rows": [{k: v for k, v in r.items() if "seconds" not in k} for r in rows],
        "summary": {k: v for k, v in summary.items() if k not in ("wall_seconds", "config")},
        "adapters_sha256": adapters_digest(load_checkpoint(out).global_state),
    }


def run(name: str, out: Path, runtime: str = "inprocess") -> dict[str, Any]:
    """Run the golden ``name`` into ``out``; returns its outcome."""
    PROFILES.mkdir(parents=True, exist_ok=True)
    for profile in ("small.yaml", "large.yaml"):
        (PROFILES / profile).write_text((GOLDEN / profile).read_text())
    raw = with_sections(RUNS[name], simulation={"runtime": runtime})
    app = hostile_client_app() if name == "hostile_median" else None
    if name == "resume":  # stopped after round 2, then resumed to round 3
        two = with_sections(raw, federation={"rounds": 2})
        simulate(config_from_dict(two), out, client_app=app)
        simulate(config_from_dict(raw), out, client_app=app, resume=True)
    else:
        simulate(config_from_dict(raw), out, client_app=app)
    return outcome(out)


def golden_path(name: str, capability: str) -> Path:
    return GOLDEN / f"{name}.{capability}.json"


def recorded(name: str) -> dict[str, Any]:
    """This CPU capability's recording of ``name``, else any other one."""
    own = golden_path(name, platform()["cpu"])
    path = own if own.is_file() else next(iter(sorted(GOLDEN.glob(f"{name}.*.json"))), None)
    if path is None:
        pytest.fail(f"{name} has no golden: record it with `python tests/test_golden.py --record`")
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    if want["platform"] == platform():
        assert got["rows"] == want["rows"]
        assert got["summary"] == want["summary"]
        assert got["adapters_sha256"] == want["adapters_sha256"]
    else:  # other kernels: the same run to a tolerance
        assert close(got["rows"], want["rows"]), (got["rows"], want["rows"])
        assert close(got["summary"], want["summary"]), (got["summary"], want["summary"])


def close(a: Any, b: Any) -> bool:
    """``a == b`` with floats compared to 1e-3 relative (1e-6 absolute) and integers to
    1 %, recursively: other kernels change the last float bits, and with them a
    compressed payload's size by a byte and the ratios computed from it (counts below
    100, such as client ids, stay exact)."""
    if isinstance(a, float) or isinstance(b, float):
        both = isinstance(a, (int, float)) and isinstance(b, (int, float))
        return both and math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6)
    if isinstance(a, int) and isinstance(b, int):
        return math.isclose(a, b, rel_tol=1e-2)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run_reproduces_bit_for_bit(name: str, tmp_path: Path) -> None:
    assert_same(run(name, tmp_path / "run"), recorded(name))


@pytest.mark.slow
def test_inprocess_equals_ray(tmp_path: Path) -> None:
    """The same run on Flower's Ray runtime gives the in-process golden to the last bit:
    the loopback's serialization, node state and threads are what Ray's are. Only the
    downlink differs, by the config text each message carries (``runtime: ray``)."""
    name = "compression_ef_downlink"
    got, want = run(name, tmp_path / "ray", runtime="ray"), recorded(name)
    longer = len(
        config_from_dict(with_sections(RUNS[name], simulation={"runtime": "ray"})).to_json()
    )
    extra = longer - len(config_from_dict(RUNS[name]).to_json())  # bytes per message
    assert extra < 0
    for row in want["rows"]:
        for key in ("downlink_bytes", "downlink_fp32_bytes"):
            row[key] += extra * len(row["clients"])
    for outcome_ in (got, want):  # the summary's downlink totals follow from the rows
        summary = outcome_["summary"]
        summary["compression"] = {
            k: v for k, v in summary["compression"].items() if "downlink" not in k
        }
        summary.pop("downlink_bytes_total")
    assert_same(got, want)


def test_the_goldens_differ_where_their_stages_differ() -> None:
    """Each golden run records something of its own (a stage that did nothing would make
    two runs alike)."""
    digests = {name: recorded(name)["adapters_sha256"] for name in RUNS}
    assert len(set(digests.values())) == len(RUNS), digests


def _record(names: list[str], keep_others: bool) -> None:
    """Record this CPU capability's goldens of ``names`` (default all). A change meant to
    change results makes the other capabilities' recordings stale, so they are deleted
    (they fall back to the tolerance until recorded there), unless ``keep_others``: the
    code is unchanged and this only adds a capability."""
    import tempfile

    from fedpeft.cli import setup_logging

    setup_logging(verbose=False)
    GOLDEN.mkdir(exist_ok=True)
    for name in names or sorted(RUNS):
        with tempfile.TemporaryDirectory() as tmp:
            got = {"platform": platform(), **run(name, Path(tmp) / "run")}
        path = golden_path(name, got["platform"]["cpu"])
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        stale = [] if keep_others else [p for p in GOLDEN.glob(f"{name}.*.json") if p != path]
        for other in stale:
            other.unlink()
        print(f"recorded {path.name}: {len(got['rows'])} rounds, {got['adapters_sha256'][:12]}")
        print("".join(f"  deleted the stale {other.name}\n" for other in stale), end="")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"]:
        sys.exit(__doc__)
    keep = "--keep-others" in sys.argv
    _record([a for a in sys.argv[2:] if a != "--keep-others"], keep_others=keep)
