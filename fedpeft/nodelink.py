"""The local link between a forwarding ClientApp and the node's warm worker
(:mod:`fedpeft.node`): frames over a Unix-domain socket, and the forwarding side.

Why: Flower 1.41 starts a new ClientApp process for every message, and each one imports
torch, transformers and peft and loads the model again (about 9 s a round on a 2-core
CPU, ``docs/deployment.md``). With ``worker=/path/to/socket`` in a SuperNode's node
config, the ClientApp imports none of them: it hands the message's content and the
node's state (``Context.state``) to a worker that has them loaded, and returns its
reply. This module imports neither torch nor transformers.

A frame, in both directions::

    "FPNW" | version (u8) | header length (u32) | body length (u64) | header | body

The header is a JSON object; ``parts`` lists the lengths of the protobuf-serialized
``RecordDict`` s that make up the body (Flower's own serialization, so arrays cross
byte for byte). A request carries the message's content and the node's state; a reply
carries the reply's content and the node's new state, or ``ok: false`` and a reason.
Both ends check the other's uid (``SO_PEERCRED``), and a declared length beyond the
limit is refused before anything of the body is read. The reply's content is the
worker's, byte for byte, except two timing values (:func:`_add_timing`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedpeft.wire import METRICS

MAGIC = b"FPNW"
VERSION = 1
PREFIX = struct.Struct(">4sBIQ")  # magic, version, header length, body length
MAX_HEADER_BYTES = 64 * 1024  # a header is a few hundred bytes of JSON
# The largest body a worker accepts unless told otherwise: a SmolLM2 message with the
# node's state is about 4 MB, FLoRA's dense merged updates of it about 110 MB both ways
DEFAULT_MAX_FRAME_MB = 256
MAX_REPLY_BYTES = 1 << 34  # what the ClientApp accepts from its own user's worker
CONNECT_TIMEOUT_S = 10.0
WORKER_KEY = "worker"  # the node-config key that names the worker's socket
OPS = ("train", "evaluate", "burnin")
# when the forwarding ClientApp's module was imported: Flower imports it after its own
# imports, the message pull and the app install (set as clients/app.py imports this)
APP_IMPORTED = time.time()

log = logging.getLogger("fedpeft")


class FrameError(ValueError):
    """A frame that breaks the protocol; the message says how, in one sentence."""


class Closed(ConnectionError):
    """The other end closed the connection before a whole frame arrived."""


@dataclass
class Frame:
    header: dict[str, Any]
    parts: list[bytes] = field(default_factory=list)


# ---------------------------------------------------------------------- frames
def encode_frame(header: dict[str, Any], parts: Sequence[bytes] = ()) -> bytes:
    header = {**header, "parts": [len(p) for p in parts]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    body_len = sum(len(p) for p in parts)
    return b"".join([PREFIX.pack(MAGIC, VERSION, len(raw), body_len), raw, *parts])


def send_frame(sock: socket.socket, header: dict[str, Any], parts: Sequence[bytes] = ()) -> None:
    sock.sendall(encode_frame(header, parts))


def _read_exact(sock: socket.socket, n: int, what: str, deadline: float | None) -> bytes:
    """``n`` bytes, held only as they arrive (a declared length commits no memory), by
    ``deadline`` (``time.monotonic()``; None: no limit)."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the {what} did not arrive in time ({got} of {n} bytes)")
            sock.settimeout(left)
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise Closed(f"the connection closed after {got} of the {n} bytes of the {what}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, max_body: int, timeout: float | None = None) -> Frame:
    """One frame, checked before its body is read: magic, version, sizes against
    ``max_body``, a JSON object header whose ``parts`` add up to the body. With
    ``timeout``, the whole frame must arrive within that many seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    prefix = _read_exact(sock, PREFIX.size, "frame prefix", deadline)
    magic, version, header_len, body_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"not a fedpeft node frame (it starts with {magic!r}, not {MAGIC!r})")
    if version != VERSION:
        raise FrameError(f"frame version {version}; this end speaks version {VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(f"a header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    if body_len > max_body:
        raise FrameError(
            f"a body of {body_len} bytes exceeds this worker's limit of {max_body} bytes "
            "(fedpeft node --max-frame-mb)"
        )
    header = _parse_header(_read_exact(sock, header_len, "header", deadline), body_len)
    parts = [_read_exact(sock, n, f"part {i}", deadline) for i, n in enumerate(header["parts"])]
    return Frame(header, parts)


def _parse_header(raw: bytes, body_len: int) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode())
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, or nested too deep
        raise FrameError(f"the header is not JSON ({type(err).__name__}: {err})"[:300]) from None
    if not isinstance(header, dict):
        raise FrameError(f"the header is a JSON {type(header).__name__}, not an object")
    parts = header.get("parts")
    if not isinstance(parts, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in parts
    ):
        raise FrameError("the header's 'parts' is not a list of byte counts")
    if sum(parts) != body_len:
        raise FrameError(
            f"the header's parts add up to {sum(parts)} bytes, the body has {body_len}"
        )
    return header


def records_to_bytes(records: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(records).SerializeToString())


def records_from_bytes(raw: bytes, what: str) -> RecordDict:
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(raw)
        return recorddict_from_proto(proto)
    except Exception as err:  # protobuf's DecodeError, or records Flower refuses
        raise FrameError(f"the {what} is not a serialized RecordDict ({err})") from None


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (Linux)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


# ---------------------------------------------------------------- forwarding
def worker_socket(context: Context) -> Path | None:
    """The worker socket this node's config names (``worker=...``), if any."""
    path = context.node_config.get(WORKER_KEY)
    return None if path in (None, "") else Path(str(path))


class NoWorker(ConnectionError):
    """Nothing listens at the configured socket: the round runs in process."""


def forward(path: Path, op: str, msg: Message, context: Context) -> Message:
    """``msg`` handled by the worker at ``path``: its reply, and ``context.state``
    replaced by the worker's. A worker that refuses, raises or dies mid-round gives an
    error reply with the reason, and the node's state stays as it was.

    Raises :class:`NoWorker` when nothing listens at ``path`` (the caller then runs the
    round in process). A process of another user at ``path`` gets nothing: an error."""
    entered = time.time()
    born = _process_born()
    try:
        sock = _connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as err:
        raise NoWorker(f"no fedpeft node worker at '{path}' ({err.strerror or err})") from None
    except OSError as err:
        return _error(msg, f"cannot use the fedpeft node worker at '{path}': {err.strerror or err}")
    with sock:
        header = {
            "op": op,
            "run_id": context.run_id,
            "node_id": context.node_id,
            "node_config": {k: v for k, v in context.node_config.items() if k != WORKER_KEY},
            # where this process's start went, for the worker's status line
            "started": {"born": born, "app": APP_IMPORTED, "forward": entered},
        }
        parts = [records_to_bytes(msg.content), records_to_bytes(context.state)]
        reply = _exchange(sock, path, header, parts, msg.metadata.ttl)
    if isinstance(reply, str):
        return _error(msg, reply)
    if not reply.header.get("ok"):
        return _error(msg, str(reply.header.get("reason", "no reason given"))[:2000])
    try:
        if len(reply.parts) != 2:
            raise FrameError(f"a reply has 2 parts, this one {len(reply.parts)}")
        content = records_from_bytes(reply.parts[0], "reply")
        new_state = records_from_bytes(reply.parts[1], "node state")
        seconds = float(reply.header.get("seconds", 0.0))
    except (FrameError, TypeError, ValueError) as err:
        return _error(msg, f"the fedpeft node worker at '{path}' sent a bad reply: {err}")
    context.state.clear()
    context.state.update(new_state)
    _add_timing(content, born, entered, seconds)
    return Message(content, reply_to=msg)


def _exchange(
    sock: socket.socket, path: Path, header: dict[str, Any], parts: list[bytes], ttl: float
) -> Frame | str:
    """Send the request, read the reply (a reason string if there is none). A worker
    that refuses a request before reading it all (too large, wrong uid) has closed its
    end: the send fails, but its answer is there to read."""
    sent_error: OSError | None = None
    try:
        send_frame(sock, header, parts)
    except OSError as err:
        sent_error = err
    try:
        # a reply after the message's time to live is of no use to the server
        return read_frame(sock, MAX_REPLY_BYTES, timeout=ttl if ttl > 0 else None)
    except TimeoutError:
        return f"the fedpeft node worker at '{path}' did not reply within {ttl:g} s"
    except (Closed, OSError) as err:
        why = sent_error or err
        return f"the fedpeft node worker at '{path}' stopped mid-round ({why})"
    except (FrameError, MemoryError) as err:
        return f"the fedpeft node worker at '{path}' sent a bad frame: {err}"


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(str(path))
        sock.settimeout(None)
        # the socket's directory is the worker's to guard, but a process of another user
        # must never receive this node's data
        uid = peer_uid(sock)
        if uid != os.getuid():
            raise PermissionError(
                1, f"it runs as uid {uid}, not as this node's uid {os.getuid()}; nothing sent"
            )
    except OSError:
        sock.close()
        raise
    return sock


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _add_timing(content: RecordDict, born: float, entered: float, worker_seconds: float) -> None:
    """A train reply's timing, as this process saw it. ``startup-seconds`` becomes this
    process's start to the message (Flower's process start, app install and message
    pull); ``load-seconds`` gains what the socket round trip added to the worker's own
    time (serializing, sending, reading back), the node's other cost outside training.
    Only values change, never keys: a reply has the same size whoever served it. Replies
    without timing (DP) get none."""
    metrics = content.metric_records.get(METRICS)
    if metrics is None or "train-seconds" not in metrics or "load-seconds" not in metrics:
        return
    relay = max(0.0, time.time() - entered - worker_seconds)
    metrics["startup-seconds"] = max(0.0, entered - born)
    metrics["load-seconds"] = float(metrics["load-seconds"]) + relay  # type: ignore[arg-type]


def _process_born() -> float:
    import psutil

    return float(psutil.Process().create_time())
