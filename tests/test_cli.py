"""The ``fedpeft`` command as a user meets it: Ctrl-C, runs it must not overwrite,
output directories it must not leave behind, and its first line before the slow imports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from fedpeft.cli import main

ROOT = Path(__file__).resolve().parents[1]
FEDPEFT = Path(sys.executable).parent / "fedpeft"
TINY = {
    "seed": 0,
    "model": {"name": "tiny-bert", "task": "classification", "max_length": 32},
    "lora": {"r": 2, "alpha": 4, "target_modules": ["query", "value"]},
    "data": {"source": "synthetic", "synthetic_samples": 300, "synthetic_classes": 3},
    "partition": {"num_clients": 2, "scheme": "iid"},
    "train": {"local_steps": 2, "batch_size": 8, "lr": 1e-3},
    "federation": {"rounds": 1000, "aggregator": "fedit", "min_clients": 2},
}


def _config(tmp_path: Path, **sections: dict[str, object]) -> Path:
    cfg = {k: {**v, **sections.get(k, {})} if isinstance(v, dict) else v for k, v in TINY.items()}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rounds(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
def test_one_ctrl_c_stops_a_simulation_quietly_and_keeps_its_checkpoint(tmp_path: Path) -> None:
    """It printed "interrupted" and then hung in the ServerApp thread's join until a
    second Ctrl-C, which ended in a traceback. Later, on a loaded machine, it sometimes
    printed a Ray actor's death (Flower's teardown raced the muting of its log)."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [str(FEDPEFT), "simulate", str(_config(tmp_path)), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # a shell's background job ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 300
        while _rounds(out) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _rounds(out) >= 2, "the run did not get going"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        interrupted = time.time()
        output, _ = proc.communicate(timeout=30)
        took = time.time() - interrupted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output[-2000:]
    assert took < 15, f"exit took {took:.0f} s"
    assert "Traceback" not in output and "Error" not in output, output[-2000:]
    assert output.strip().endswith("(continue with --resume).")
    assert (out / "checkpoint.npz").is_file() and not (out / "summary.json").exists()
    time.sleep(2)  # Ray's processes are stopped, not left to linger
    # (a zombie has exited: only its parent's wait() is missing, which this sandbox's
    # init may never do)
    left = [p for p in psutil.process_iter() if _session(p) == proc.pid and _alive(p)]
    assert not left, [(p.pid, p.name()) for p in left]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _session(process: psutil.Process) -> int:
    try:
        return os.getsid(process.pid)
    except OSError:
        return -1


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({"metrics.jsonl": "{}\n", "checkpoint.npz": ""}, "already holds a run (metrics.jsonl"),
        ({"metrics.jsonl": "{}\n", "summary.json": "{}"}, "already holds a finished run"),
    ],
)
def test_simulate_into_a_directory_holding_a_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, str], fragment: str
) -> None:
    """It silently replaced the earlier run's metrics, checkpoint and adapter."""
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    assert main(["simulate", str(_config(tmp_path)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "--resume" in err and "--force" in err
    assert {p.name: p.read_text() for p in out.iterdir()} == files  # untouched


def test_audit_into_a_directory_holding_an_audit_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "audit.md").write_text("earlier audit")
    assert main(["audit", str(_config(tmp_path)), "--out", str(out)]) == 2
    assert "already holds a run (audit.md); pass --force" in capsys.readouterr().err
    assert (out / "audit.md").read_text() == "earlier audit"


def test_a_run_that_fails_leaves_no_empty_output_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, data={"source": str(tmp_path / "missing.jsonl")})
    out = tmp_path / "new" / "run"
    assert main(["simulate", str(config), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()
    kept = tmp_path / "mine"  # a directory the user made is theirs: it stays
    kept.mkdir()
    assert main(["simulate", str(config), "--out", str(kept)]) == 2
    assert kept.is_dir()


def test_credentials_mistakes_are_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["credentials", "/proc/nope", "--nodes", "1"]) == 2
    assert capsys.readouterr().err.startswith("fedpeft: ")
    creds = tmp_path / "creds"
    assert main(["credentials", str(creds), "--nodes", "1"]) == 0
    ca = (creds / "ca.crt").read_bytes()
    capsys.readouterr()
    # a second call would replace the CA: every deployed node would stop being trusted
    assert main(["credentials", str(creds), "--nodes", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (creds / "ca.crt").read_bytes() == ca
    assert main(["credentials", str(creds), "--nodes", "1", "--force"]) == 0
    assert (creds / "ca.crt").read_bytes() != ca


def test_the_first_line_comes_before_torch_is_imported() -> None:
    """10-20 s of imports passed before the first line: the CLI imported torch (through
    fedpeft.models) before it could say anything."""
    code = (
        "import sys, logging; from fedpeft import cli; "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'flwr', 'ray') if m in sys.modules)))"
    )
    got = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(got.stdout) == []


def test_the_loading_line_is_logged_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, data={"source": str(tmp_path / "missing.jsonl")})
    assert main(["simulate", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.index("simulate") < err.index("fedpeft: Data file")


def test_node_mistakes_are_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each before the worker's imports of torch and the model: nothing listens yet."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    private = tmp_path / "private"
    cases = {
        "lets other users in": ["--socket", str(shared / "node.sock")],
        "without its 'worker' key": [
            "--socket", str(private / "n.sock"), "--node-config", "partition-id=0 worker='x'",
        ],
        "must be > 0": ["--socket", str(private / "n.sock"), "--max-frame-mb", "0"],
        "holds at most 107": ["--socket", str(private / ("x" * 120))],
        "does not parse": ["--socket", str(private / "n.sock"), "--node-config", "a=/b"],
    }  # fmt: skip
    for reason, args in cases.items():
        assert main(["node", *args]) == 2, reason
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("fedpeft: ") and reason in err[-1], err
    assert not (private / "n.sock").exists()
