"""The warm node worker (``fedpeft node``) and the ClientApp that forwards to it.

The protocol tests serve a real :class:`fedpeft.node.Worker` on a real Unix socket in a
thread, with a small handler that counts its messages in the node's state; the parity
test runs real ``fedpeft node`` processes with fedpeft's own handlers against the same
federation in process. (tests/test_deploy_worker.py runs workers beside real
SuperNodes and kills one mid-run.)
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from clients.app import make_client_app
from fedpeft import nodelink
from fedpeft.config import ConfigError, config_from_dict
from fedpeft.loopback import LoopbackGrid, run_loopback
from fedpeft.node import Limits, Worker, bind_private
from server.app import make_server_app
from tests.deployment import wait_listening
from tests.test_simulation import TINY

ROOT = Path(__file__).resolve().parents[1]


def counting(content: RecordDict, node_state: RecordDict) -> RecordDict:
    """Counts its messages in the node's state; fails when the message asks it to."""
    if "fail" in content.config_records:
        node_state["count"] = ConfigRecord({"n": -1})  # a failed round keeps nothing
        raise ValueError("asked to fail")
    count = node_state.config_records.get("count", ConfigRecord({"n": 0}))
    n = int(count["n"]) + 1  # type: ignore[call-overload]
    node_state["count"] = ConfigRecord({"n": n})
    metrics = {"num-examples": n, "train-seconds": 0.25, "load-seconds": 0.0}
    return RecordDict({"metrics": MetricRecord(metrics)})


class Served:
    """A worker answering in a thread until the listener closes."""

    def __init__(self, path: Path, worker: Worker) -> None:
        self.path, self.worker = path, worker
        self.listener = bind_private(path)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self.worker.handle(conn)

    def close(self) -> None:
        if self.listener.fileno() >= 0:  # not closed yet
            self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
        self.thread.join(5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    served: list[Served] = []

    def start(node_config: dict[str, Any] | None = None, **limits: Any) -> Served:
        directory = tmp_path / "run"
        directory.mkdir(mode=0o700, exist_ok=True)
        worker = Worker(
            node_config, Limits(**limits), {"train": counting, "evaluate": counting}, io.StringIO()
        )
        served.append(Served(directory / f"w{len(served)}.sock", worker))
        return served[-1]

    yield start
    for s in served:
        s.close()


def node_grid(path: Path | str, run_id: int = 1, **node_config: Any) -> LoopbackGrid:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 1
    grid = LoopbackGrid(make_client_app(), 1, None, [{"worker": str(path), **node_config}])
    for context in grid.contexts.values():
        context.run_id = run_id
    return grid


def train(grid: LoopbackGrid, fail: bool = False) -> Message:
    content = RecordDict({"fail": ConfigRecord({"yes": 1})} if fail else {})
    msg = Message(content, dst_node_id=next(iter(grid.contexts)), message_type=MessageType.TRAIN)
    (reply,) = grid.send_and_receive([msg])
    return reply


def count(grid: LoopbackGrid) -> int:
    (context,) = grid.contexts.values()
    return int(context.state.config_records["count"]["n"])  # type: ignore[call-overload]


def raw_exchange(path: Path, data: bytes, shut: bool = True) -> dict[str, Any]:
    """Sends raw bytes, returns the worker's answer header."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        return nodelink.read_frame(sock, 1 << 20).header


# ------------------------------------------------------------------ the link
def test_the_worker_serves_messages_and_the_state_lives_in_the_context(serve: Any) -> None:
    worker = serve()
    grid = node_grid(worker.path)
    replies = [train(grid) for _ in range(3)]
    assert [r.content.metric_records["metrics"]["num-examples"] for r in replies] == [1, 2, 3]
    assert count(grid) == 3  # the SuperNode's Context.state, not only the worker's memory
    metrics = replies[-1].content.metric_records["metrics"]
    # the forwarding process's start, and the socket round trip on top of the worker's 0
    assert metrics["startup-seconds"] > 0 and 0 < metrics["load-seconds"] < 5
    assert worker.worker.served == 3


def test_a_restarted_worker_goes_on_from_the_nodes_state(serve: Any) -> None:
    first = serve()
    grid = node_grid(first.path)
    train(grid), train(grid)
    first.close()
    second = serve()  # a new worker: nothing in memory
    (context,) = grid.contexts.values()
    context.node_config["worker"] = str(second.path)
    assert train(grid).content.metric_records["metrics"]["num-examples"] == 3


def test_a_raising_handler_is_an_error_reply_in_flowers_form_and_keeps_the_state(
    serve: Any,
) -> None:
    grid = node_grid(serve().path)
    train(grid)
    reply = train(grid, fail=True)
    assert reply.has_error()
    assert reply.error.reason == "<class 'ValueError'>:<'asked to fail'>"  # as Flower writes it
    assert count(grid) == 1  # the failed round's state change was not kept
    assert train(grid).content.metric_records["metrics"]["num-examples"] == 2


def test_without_a_worker_listening_the_round_runs_in_process(tmp_path: Path, caplog: Any) -> None:
    """An empty socket path: the ClientApp trains itself (here with fedpeft's handlers,
    on a tiny model) and says why."""
    cfg = config_from_dict({**TINY, "federation": {"rounds": 1, "min_clients": 1}})
    configs: list[Any] = [
        {"partition-id": i, "num-partitions": 3, "worker": str(tmp_path / "none.sock")}
        for i in range(3)
    ]
    run_loopback(make_server_app(cfg, tmp_path / "out"), make_client_app(), 3, None, configs)
    rows = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert sorted(json.loads(rows[0])["clients"]) == [0, 1, 2]
    assert "no fedpeft node worker at" in caplog.text and "runs in the ClientApp" in caplog.text


def test_a_worker_that_dies_mid_round_gives_an_error_reply(tmp_path: Path) -> None:
    """A listener that reads the request and closes without replying, as a killed
    worker's socket does."""
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    listener = bind_private(directory / "dying.sock")

    def die() -> None:
        conn, _ = listener.accept()
        conn.recv(1 << 16)
        conn.close()

    thread = threading.Thread(target=die, daemon=True)
    thread.start()
    grid = node_grid(directory / "dying.sock")
    (context,) = grid.contexts.values()
    context.state["count"] = ConfigRecord({"n": 7})
    reply = train(grid)
    thread.join(5)
    listener.close()
    assert reply.has_error() and "stopped mid-round" in reply.error.reason
    assert count(grid) == 7


# ------------------------------------------------------------------ safety
def test_a_peer_of_another_uid_is_refused(serve: Any) -> None:
    worker = serve(allowed_uid=os.getuid() + 1)  # as if this test ran as someone else
    reply = train(node_grid(worker.path))
    assert reply.has_error() and f"peer uid {os.getuid()} is not" in reply.error.reason
    assert worker.worker.served == 0


def test_the_worker_belongs_to_one_run_at_a_time(serve: Any) -> None:
    busy = serve()
    train(node_grid(busy.path, run_id=11))
    refused = train(node_grid(busy.path, run_id=12))
    assert refused.has_error()
    assert (
        "belongs to run 11" in refused.error.reason and "run 12 is refused" in refused.error.reason
    )
    free = serve(release_after=0.0)  # a run quiet for 0 s releases the worker
    train(node_grid(free.path, run_id=11))
    assert not train(node_grid(free.path, run_id=12)).has_error()


def test_a_message_from_another_node_config_is_refused(serve: Any) -> None:
    worker = serve({"partition-id": 0})
    assert not train(node_grid(worker.path, **{"partition-id": 0})).has_error()
    reply = train(node_grid(worker.path, **{"partition-id": 1}))
    assert reply.has_error() and "serves the node config {'partition-id': 0}" in reply.error.reason


MALFORMED = {
    "garbage": (b"hello worker, please train" * 3, "not a fedpeft node frame"),
    "version": (nodelink.PREFIX.pack(nodelink.MAGIC, 9, 2, 0) + b"{}", "frame version 9"),
    "huge header": (nodelink.PREFIX.pack(nodelink.MAGIC, 1, 1 << 30, 0), "a header of"),
    "huge body": (nodelink.PREFIX.pack(nodelink.MAGIC, 1, 2, 1 << 40), "exceeds this worker's limit"),
    "not json": (nodelink.PREFIX.pack(nodelink.MAGIC, 1, 3, 0) + b"{{{", "not JSON"),
    "a list": (nodelink.PREFIX.pack(nodelink.MAGIC, 1, 2, 0) + b"[]", "JSON list, not an object"),
    "parts": (nodelink.PREFIX.pack(nodelink.MAGIC, 1, 26, 3) + b'{"op":"train","parts":[5]}abc', "add up to 5 bytes, the body has 3"),
    "nested": (nodelink.PREFIX.pack(nodelink.MAGIC, 1, 60000, 0) + b"[" * 30000 + b"]" * 30000, "not JSON"),
    "body": (nodelink.encode_frame({"op": "train", "run_id": 1}, [b"\xff" * 9, b""]), "not a serialized"),
    "op": (nodelink.encode_frame({"op": "shutdown", "run_id": 1}, [b"", b""]), "op 'shutdown'"),
    "run": (nodelink.encode_frame({"op": "train", "run_id": "x"}, [b"", b""]), "run id 'x'"),
    "truncated": (nodelink.encode_frame({"op": "train"}, [b"abcdef"])[:-3], "closed"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_frame_is_answered_with_its_reason_and_the_worker_goes_on(
    serve: Any, case: str
) -> None:
    data, reason = MALFORMED[case]
    worker = serve(max_frame=1 << 20)
    if reason == "closed":  # the peer hung up mid-frame: nobody to answer, nothing to crash
        with pytest.raises(nodelink.Closed):
            raw_exchange(worker.path, data)
    else:
        header = raw_exchange(worker.path, data, shut=case not in ("huge body", "huge header"))
        assert header["ok"] is False and reason in header["reason"]
    grid = node_grid(worker.path)
    assert train(grid).content.metric_records["metrics"]["num-examples"] == 1


def test_a_peers_numbers_that_overflow_do_not_stop_the_worker(serve: Any) -> None:
    """The status line reads the ClientApp's timestamps; 10**400 is valid JSON."""
    worker = serve()
    empty = nodelink.records_to_bytes(RecordDict())
    frame = nodelink.encode_frame({"op": "train", "run_id": 1, "started": {"born": 1}}, [empty] * 2)
    frame = frame.replace(b'"born":1', b'"born":1' + b"0" * 400)
    frame = (
        nodelink.PREFIX.pack(
            nodelink.MAGIC,
            1,
            nodelink.PREFIX.unpack(frame[: nodelink.PREFIX.size])[2] + 400,
            2 * len(empty),
        )
        + frame[nodelink.PREFIX.size :]
    )
    assert raw_exchange(worker.path, frame)["ok"] is True
    assert train(node_grid(worker.path)).content.metric_records["metrics"]["num-examples"] == 1


def test_a_request_above_the_limit_reaches_the_server_with_the_workers_reason(
    serve: Any,
) -> None:
    """The worker refuses it after its prefix and closes: the ClientApp's send breaks
    off, and it still reads the refusal."""
    worker = serve(max_frame=1 << 20)
    grid = node_grid(worker.path)
    big = RecordDict({"x": ArrayRecord({"x": Array(np.zeros(4 << 20, dtype=np.float32))})})
    msg = Message(big, dst_node_id=next(iter(grid.contexts)), message_type=MessageType.TRAIN)
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and "exceeds this worker's limit of 1048576" in reply.error.reason


def test_the_socket_is_private(tmp_path: Path) -> None:
    private = tmp_path / "private"
    listener = bind_private(private / "node.sock")  # the directory is created 0700
    try:
        assert stat.S_IMODE((private / "node.sock").stat().st_mode) == 0o600
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        with pytest.raises(ConfigError, match="already listens"):
            bind_private(private / "node.sock")
    finally:
        listener.close()
    bind_private(private / "node.sock").close()  # a stale socket is replaced
    (private / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        bind_private(private / "file")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ConfigError, match="mode 755, which lets other users in"):
        bind_private(shared / "node.sock")
    with pytest.raises(ConfigError, match="a Unix socket's path holds at most 107"):
        bind_private(private / ("x" * 120))


def test_the_forwarding_client_app_imports_no_torch(tmp_path: Path) -> None:
    """The process Flower starts per message stays light when a worker serves the node."""
    script = f"""
import io, sys
from pathlib import Path
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from clients.app import make_client_app
from fedpeft.loopback import LoopbackGrid
from fedpeft.node import Limits, Worker, bind_private

def counting(content, node_state):
    node_state["count"] = ConfigRecord({{"n": 1}})
    return RecordDict({{"metrics": MetricRecord({{"num-examples": 1, "train-seconds": 0.1}})}})

path = Path({str(tmp_path / "run" / "w.sock")!r})
listener = bind_private(path)
worker = Worker(None, Limits(), {{"train": counting}}, io.StringIO())
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
grid = LoopbackGrid(make_client_app(), 1, None, [{{"worker": str(path)}}])
msg = Message(RecordDict(), dst_node_id=next(iter(grid.contexts)), message_type=MessageType.TRAIN)
import threading
def once():
    conn, _ = listener.accept()
    with conn:
        worker.handle(conn)
threading.Thread(target=once).start()
(reply,) = grid.send_and_receive([msg])
assert reply.content.metric_records["metrics"]["num-examples"] == 1, reply
print(sorted(m for m in ("torch", "transformers", "peft", "opacus") if m in sys.modules))
"""
    (tmp_path / "run").mkdir(mode=0o700)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------ parity
def start_worker(path: Path, node_config: str, log: Path) -> subprocess.Popen[bytes]:
    import torch

    # the same torch threads as this process, so that both compute the same bits
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "fedpeft.cli", "node", "--socket", str(path),
             "--node-config", node_config],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip


def tapped(log: list[dict[str, Any]]) -> Any:
    """A client mod that records each reply: its bytes apart from the timings, and the
    node's state after it."""

    def tap(msg: Message, context: Context, call_next: Any) -> Message:
        reply: Message = call_next(msg, context)
        if msg.metadata.message_type == MessageType.QUERY:
            return reply
        content = reply.content
        metrics = {k: v for k, v in content.metric_records["metrics"].items() if "seconds" not in k}
        arrays = RecordDict(dict(content.array_records))
        state = {k: nodelink.records_to_bytes(RecordDict({k: v})) for k, v in context.state.items()}
        log.append(
            {
                "type": msg.metadata.message_type,
                "node": context.node_config["partition-id"],
                "arrays": nodelink.records_to_bytes(arrays),
                "configs": {k: dict(v) for k, v in content.config_records.items()},
                "metrics": metrics,
                "state": state,
            }
        )
        return reply

    return tap


@pytest.mark.slow
def test_a_worker_gives_the_same_replies_bytes_and_metrics_as_the_client_app(
    tmp_path: Path,
) -> None:
    """Compression both ways with error feedback and client evaluation: every node-state
    record is exercised. In process, then with one ``fedpeft node`` process per node."""
    cfg = config_from_dict(
        {
            **TINY,
            "federation": {"rounds": 3, "min_clients": 3, "client_eval": True},
            "compression": {"density": 0.2, "error_feedback": True, "downlink": True},
        }
    )
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    runs: dict[str, list[dict[str, Any]]] = {"inprocess": [], "worker": []}
    run_loopback(
        make_server_app(cfg, tmp_path / "inprocess"),
        make_client_app([tapped(runs["inprocess"])]),
        3, None, nodes,  # type: ignore[arg-type]
    )  # fmt: skip
    sockets = tmp_path / "run"
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    procs = [
        start_worker(sockets / f"node{i}.sock", f"partition-id={i} num-partitions=3", logs[i])
        for i in range(3)
    ]
    try:
        for log, proc in zip(logs, procs, strict=True):
            wait_listening(log, proc)
        with_worker = [{**n, "worker": str(sockets / f"node{i}.sock")} for i, n in enumerate(nodes)]
        run_loopback(
            make_server_app(cfg, tmp_path / "worker"),
            make_client_app([tapped(runs["worker"])]),
            3, None, with_worker,  # type: ignore[arg-type]
        )  # fmt: skip
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in procs]
    assert codes == [0, 0, 0], [log.read_text()[-2000:] for log in logs]
    assert not list(sockets.iterdir()), "a worker left its socket behind"
    status = logs[0].read_text()
    assert status.count(" train: ") == 3 and "stopping after 6 messages" in status

    assert len(runs["worker"]) == len(runs["inprocess"]) == 18  # 3 nodes x 3 rounds x 2
    for ours, theirs in zip(runs["inprocess"], runs["worker"], strict=True):
        assert ours == theirs
    rows = {
        mode: [
            {k: v for k, v in json.loads(line).items() if "seconds" not in k}
            for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        ]
        for mode in runs
    }
    assert rows["inprocess"] == rows["worker"]
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "inprocess" / adapter).read_bytes() == (
        tmp_path / "worker" / adapter
    ).read_bytes()
    last = json.loads((tmp_path / "worker" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(last["client_seconds"]["0"]) == {"startup", "load", "train"}


def test_a_worker_stopped_mid_round_answers_that_round_with_an_error() -> None:
    """SIGTERM's handler raises :class:`Shutdown` wherever the worker is, here inside
    training: the round in progress gets the reason, and the worker stops."""
    from fedpeft.node import Shutdown

    def stopped(content: RecordDict, node_state: RecordDict) -> RecordDict:
        raise Shutdown("SIGTERM")

    worker = Worker(None, Limits(), {"train": stopped}, io.StringIO())
    ours, theirs = socket.socketpair()
    with ours, theirs:
        empty = nodelink.records_to_bytes(RecordDict())
        nodelink.send_frame(ours, {"op": "train", "run_id": 1}, [empty, empty])
        with pytest.raises(Shutdown):
            worker.handle(theirs)
        reply = nodelink.read_frame(ours, 1 << 20).header
    assert reply == {"ok": False, "reason": reply["reason"], "parts": []}
    assert "stopped during this round" in reply["reason"]


def test_sigterm_mid_round_answers_the_round_removes_the_socket_and_exits_0(
    tmp_path: Path,
) -> None:
    """A real signal to a real worker process (its handler sleeps, as training would)."""
    path = tmp_path / "run" / "slow.sock"
    script = f"""
import time
from pathlib import Path
from flwr.app import RecordDict
from fedpeft.node import run_worker

def slow(content, node_state):
    time.sleep(60)
    return RecordDict()

raise SystemExit(run_worker(Path({str(path)!r}), None, handlers={{"train": slow}}))
"""
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT
        )
    try:
        wait_listening(log, proc, 60)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            empty = nodelink.records_to_bytes(RecordDict())
            nodelink.send_frame(sock, {"op": "train", "run_id": 1}, [empty, empty])
            time.sleep(1.0)  # the worker is asleep in its handler
            proc.send_signal(signal.SIGTERM)
            reply = nodelink.read_frame(sock, 1 << 20, timeout=30).header
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert reply["ok"] is False and "stopped during this round" in reply["reason"]
    assert not path.exists()
    assert "SIGTERM: stopping after 0 messages" in log.read_text()
