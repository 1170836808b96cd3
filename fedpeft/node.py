"""``fedpeft node``: a long-lived worker beside a SuperNode, so that a round no longer
pays for Python, torch and the model.

Flower 1.41 starts a ClientApp process per message and ends it after one task (its issue
#3670, a non-ephemeral ClientApp, is open). The worker is the process that stays: it
imports torch once, and the model, tokenizer and partition it loads in its first round
stay cached in memory (:mod:`fedpeft.client`'s caches) for every later one. The
ClientApp, given ``worker=/path/to/socket`` in the SuperNode's node config, forwards
each train and evaluate message here (:mod:`fedpeft.nodelink`), where the same handlers
run (:mod:`fedpeft.handlers`), so the replies are the same bytes.

The node's state (error-feedback residual, accountant history, downlink view, FLoRA's
merged base) is the SuperNode's ``Context.state``: it travels with every message and
comes back with the reply, so a worker that dies or restarts loses nothing of it.

Safety, for a worker that trusts nothing it reads:

- the socket is created with mode 0600 (no window: the umask is set before ``bind``) in
  a directory owned by this user that no one else can enter;
- a peer whose uid differs from the worker's (``SO_PEERCRED``) is refused;
- a frame larger than ``max_frame`` bytes is refused before its body is read; a
  malformed one is answered with the reason and the worker goes on;
- a peer that does not send its whole frame, or read its reply, within ``read_timeout``
  seconds is dropped;
- the worker belongs to one run at a time: another run's message is refused, with both
  run ids, until the current run has been quiet (no message, no reply in progress) for
  ``release_after`` seconds;
- SIGTERM or SIGINT stops it: a round in progress is answered with an error, the socket
  is removed, and it exits 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from flwr.app import RecordDict

from fedpeft import nodelink
from fedpeft.config import ConfigError

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with its terminating NUL
DEFAULT_RELEASE_AFTER_S = 600.0
DEFAULT_READ_TIMEOUT_S = 60.0


class Shutdown(BaseException):
    """SIGTERM or SIGINT: stop serving. A BaseException, so that no ``except Exception``
    on the way (ours, or one inside torch or datasets) can swallow it."""


@dataclass
class Limits:
    max_frame: int = nodelink.DEFAULT_MAX_FRAME_MB << 20
    release_after: float = DEFAULT_RELEASE_AFTER_S
    read_timeout: float = DEFAULT_READ_TIMEOUT_S
    allowed_uid: int = -1  # -1: this process's uid


Handler = Callable[[RecordDict, RecordDict], RecordDict]


def _default_handlers() -> dict[str, Handler]:
    from fedpeft import handlers  # torch, transformers, peft: once, for the worker's life

    return {"train": handlers.train, "evaluate": handlers.evaluate, "burnin": handlers.burnin}


# ------------------------------------------------------------------- the socket
def check_socket_path(path: Path) -> None:
    """Refuse (:class:`ConfigError`, one sentence) a path a socket cannot be made private
    at: too long, in a directory others can enter, taken by a live worker or a file.
    Creates the directory (0700) if it is missing and removes a stale socket."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"The socket path '{path}' is {len(os.fsencode(path))} bytes; a Unix socket's "
            f"path holds at most {MAX_SOCKET_PATH}."
        )
    _private_directory(path.parent)
    if os.path.lexists(path):
        _remove_stale(path)


def bind_private(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600, in a directory only this user can
    enter (created 0700 if missing). A stale socket left by a killed worker is replaced;
    a live one, or anything that is not a socket, is refused (:class:`ConfigError`)."""
    check_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: no moment at which others may connect
    try:
        sock.bind(str(path))
    except OSError as err:
        sock.close()
        raise ConfigError(f"Cannot create the socket '{path}' ({err.strerror or err}).") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(8)
    return sock


def _private_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as err:
        raise ConfigError(
            f"Cannot create the socket's directory '{directory}' ({err.strerror or err})."
        ) from None
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"The socket's directory '{directory}' belongs to uid {info.st_uid}, not to this "
            f"user ({os.getuid()}); use a directory of your own, e.g. $XDG_RUNTIME_DIR/fedpeft."
        )
    if info.st_mode & 0o077:
        raise ConfigError(
            f"The socket's directory '{directory}' has mode {stat.S_IMODE(info.st_mode):o}, "
            f"which lets other users in; `chmod 700 {directory}` or use another directory."
        )


def _remove_stale(path: Path) -> None:
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ConfigError(f"'{path}' exists and is not a socket; choose another --socket path.")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:  # nobody listens: a worker was killed without removing it
        path.unlink()
        return
    finally:
        probe.close()
    raise ConfigError(f"A worker already listens at '{path}'; stop it first (SIGTERM).")


# ------------------------------------------------------------------- the worker
class Worker:
    """Serves one connection at a time: one message, one reply."""

    def __init__(
        self,
        node_config: dict[str, Any] | None,
        limits: Limits | None = None,
        handlers: dict[str, Handler] | None = None,
        out: TextIO = sys.stdout,
    ) -> None:
        self.node_config = node_config
        self.limits = limits or Limits()
        self.uid = self.limits.allowed_uid if self.limits.allowed_uid >= 0 else os.getuid()
        self.handlers = handlers if handlers is not None else _default_handlers()
        self.out = out
        self.run_id: int | None = None  # the run this worker belongs to
        self.last_seen = 0.0  # that run's last message or reply (monotonic)
        self.served = 0

    def status(self, line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} fedpeft node | {line}", file=self.out, flush=True)

    def serve(self, listener: socket.socket) -> None:
        """Answer connections until :class:`Shutdown`."""
        while True:
            conn, _ = listener.accept()
            with conn:
                self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        """One request and its reply; nothing a peer sends can stop the worker."""
        try:
            uid = nodelink.peer_uid(conn)
            if uid != self.uid:
                self._refuse(conn, f"peer uid {uid} is not this worker's uid {self.uid}")
                return
            # the whole frame within the read timeout: a peer trickling bytes is dropped
            frame = nodelink.read_frame(conn, self.limits.max_frame, self.limits.read_timeout)
            conn.settimeout(None)  # training takes as long as it takes
            self._answer(conn, frame)
        except nodelink.FrameError as err:
            self._refuse(conn, f"malformed frame: {err}")
        except (nodelink.Closed, TimeoutError) as err:
            self.status(f"dropped a connection: {err or 'it stalled'}")
        except Shutdown:
            self._refuse(conn, "the fedpeft node worker was stopped during this round")
            raise
        except OSError as err:  # the peer went away while we wrote
            self.status(f"lost a connection: {err}")
        except Exception as err:  # whatever a peer sent, the worker stays up
            self._refuse(conn, f"the worker failed on this request ({type(err).__name__}: {err})")

    def _send(self, conn: socket.socket, header: dict[str, Any], parts: list[bytes]) -> None:
        """A frame to a peer that must read it within the read timeout."""
        conn.settimeout(self.limits.read_timeout)
        nodelink.send_frame(conn, header, parts)

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        reason = reason[:2000]
        self.status(f"refused: {reason}")
        with contextlib.suppress(OSError):  # the peer may be gone already
            self._send(conn, {"ok": False, "reason": reason}, [])

    def _answer(self, conn: socket.socket, frame: nodelink.Frame) -> None:
        header = frame.header
        op, run_id = header.get("op"), header.get("run_id")
        if op not in self.handlers or len(frame.parts) != 2:
            self._refuse(conn, f"malformed request: op {op!r} with {len(frame.parts)} parts")
            return
        if not isinstance(run_id, int) or isinstance(run_id, bool):
            self._refuse(conn, f"malformed request: run id {run_id!r}")
            return
        busy = self._owner_refusal(run_id)
        if busy:
            self._refuse(conn, busy)
            return
        if self.node_config is not None and header.get("node_config") != self.node_config:
            self._refuse(
                conn,
                f"this worker serves the node config {self.node_config}, the message comes "
                f"from a SuperNode with {header.get('node_config')}",
            )
            return
        content = nodelink.records_from_bytes(frame.parts[0], "message content")
        node_state = nodelink.records_from_bytes(frame.parts[1], "node state")
        self.run_id, self.last_seen = run_id, time.monotonic()
        # a run is quiet from its last reply on, not from its last message: its own
        # training time does not count towards --release-after
        try:
            self._serve_request(conn, op, run_id, content, node_state, header)
        finally:
            self.last_seen = time.monotonic()

    def _serve_request(
        self,
        conn: socket.socket,
        op: str,
        run_id: int,
        content: RecordDict,
        node_state: RecordDict,
        header: dict[str, Any],
    ) -> None:
        started = time.perf_counter()
        try:
            reply = self.handlers[op](content, node_state)
        except Shutdown:
            raise
        except Exception as err:  # the same reason Flower's runtime would write
            reason = f"{type(err)}:<'{err}'>"
            self.status(f"run {run_id}, {op} raised: {reason}")
            self._send(conn, {"ok": False, "reason": reason}, [])
            return
        seconds = time.perf_counter() - started
        parts = [nodelink.records_to_bytes(reply), nodelink.records_to_bytes(node_state)]
        self._send(conn, {"ok": True, "seconds": seconds}, parts)
        self.served += 1
        self.status(_round_line(run_id, op, content, reply, seconds) + _started(header))

    def _owner_refusal(self, run_id: int) -> str:
        """Why a message of ``run_id`` is refused ('' if it is not)."""
        if self.run_id is None or run_id == self.run_id:
            return ""
        quiet = time.monotonic() - self.last_seen
        if quiet >= self.limits.release_after:
            self.status(f"run {self.run_id} quiet for {quiet:.0f} s; now serving run {run_id}")
            return ""
        return (
            f"this fedpeft node worker belongs to run {self.run_id} (last active "
            f"{quiet:.0f} s ago); run {run_id} is refused until run {self.run_id} has been "
            f"quiet for {self.limits.release_after:.0f} s, or start a worker of its own"
        )


def _round_line(run_id: int, op: str, content: RecordDict, reply: RecordDict, s: float) -> str:
    """One status line: run, round, what the reply says, how long it took."""
    from fedpeft import wire

    config = content.config_records.get(wire.CONFIG)
    number = config.get("server-round") if config is not None else None
    round_number = number if isinstance(number, int) else "?"
    metrics = reply.metric_records.get(wire.METRICS)
    shown = []
    if metrics is not None:
        for key in (
            "num-examples",
            "train-loss",
            "accuracy",
            "exact_match",
            "load-seconds",
            "train-seconds",
        ):
            if key in metrics:
                value = metrics[key]
                shown.append(_shown(key, value))
    return f"run {run_id} round {round_number} {op}: {', '.join(shown) or 'done'} | {s:.2f} s"


def _started(header: dict[str, Any]) -> str:
    """Where the forwarding ClientApp process's start went: Flower's part (interpreter,
    imports, message pull, app install) until it imported the app, then the rest until
    it forwarded."""
    started = header.get("started")
    if not isinstance(started, dict):
        return ""
    try:
        born, app, forward = (float(started[k]) for k in ("born", "app", "forward"))
        return (
            f" | ClientApp process: {app - born:.2f} s to the app, {forward - app:.2f} s to forward"
        )
    except Exception:  # the peer's numbers: shown if they make sense, never fatal
        return ""


def _shown(key: str, value: Any) -> str:
    if not isinstance(value, float):
        return f"{key} {value}"
    return f"{key} {value:.3f}" if key.endswith("seconds") else f"{key} {value:.4g}"


# ------------------------------------------------------------------- lifecycle
def _raise_shutdown(signum: int, frame: FrameType | None) -> None:
    raise Shutdown(signal.Signals(signum).name)


def run_worker(
    path: Path,
    node_config: dict[str, Any] | None,
    limits: Limits | None = None,
    handlers: dict[str, Handler] | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Serve at ``path`` in the foreground until SIGTERM or SIGINT; returns the exit
    code (0). The socket is removed on the way out, also after an error."""
    check_socket_path(path)  # a mistake ends here, before seconds of imports
    # torch is imported before the socket listens: until then a ClientApp finds no
    # worker and runs its round itself, rather than waiting in the listen queue
    worker = Worker(node_config, limits, handlers, out)
    listener = bind_private(path)
    inode = path.stat().st_ino
    previous = {s: signal.signal(s, _raise_shutdown) for s in (signal.SIGTERM, signal.SIGINT)}
    worker.status(f"listening at {path} (pid {os.getpid()}, node config {node_config or 'any'})")
    try:
        worker.serve(listener)
    except Shutdown as why:
        worker.status(f"{why}: stopping after {worker.served} messages")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        listener.close()
        # only our own socket: a newer worker may have replaced a path we were told to free
        if os.path.lexists(path) and path.lstat().st_ino == inode:
            path.unlink()
    return 0
