"""fedpeft ClientApp: decode the message, run the client stages (:mod:`fedpeft.stages`),
encode the reply.

The node answers the server's query with its node config; the server then names the
partition and this node's LoRA plan in every train message, so both sides agree. In
simulation Flower sets ``partition-id``. A real SuperNode declares who it is in its
``--node-config`` (all keys optional):

- ``partition-id`` (int): the data partition; a missing, taken or out-of-range id gets
  a free one.
- ``memory-mb`` (number > 0): memory budget of one training step, in MiB. It makes the
  declaration: the server plans this node's LoRA depth and ranks for it (as for a
  ``fleet.profiles`` entry), overriding the run config's profile for this partition.
- ``device`` (string): profile name shown in the outputs (default ``declared``).
- ``speed`` (number > 0, default 1.0): compute speed relative to the reference device.
- ``uplink-mbps`` (number > 0, default 10): uplink bandwidth in megabits per second.
- ``max-rank`` (int >= 1): highest LoRA rank for this node (capped by ``fleet.max_rank``).
- ``worker`` (path): the Unix socket of this node's warm worker (``fedpeft node``), which
  trains and evaluates in its place (:mod:`fedpeft.nodelink`); this process then imports
  neither torch nor transformers. If nothing listens there, the round runs here.

    flower-supernode --insecure --superlink 127.0.0.1:8000 --port 9094 \
        --node-config "partition-id=0 device='phone' memory-mb=150 speed=0.5 uplink-mbps=5 max-rank=2"

A malformed declaration (a non-positive or non-numeric value, profile keys without
``memory-mb``) or a budget too small to train one layer leaves the node out of the run,
with a server-side warning that names the node and the reason.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

# Only the query is answered at module level: a deployment starts a ClientApp process
# per message, and the query round needs none of torch, transformers and peft (about 10 s
# of imports on a small CPU). Training and evaluation import the library when they run,
# and not at all when a warm worker (``fedpeft node``) serves this node.
from fedpeft import declaration, nodelink, threads, wire

log = logging.getLogger("fedpeft")


def query(msg: Message, context: Context) -> Message:
    """Tell the server who this node is: its whole node config (partition, declared device
    profile). The server validates it, since only it can leave a bad node out cleanly.
    The worker's socket path is this machine's business, not the server's."""
    declared = {k: v for k, v in context.node_config.items() if k != nodelink.WORKER_KEY}
    return Message(declaration.encode_profile(declared), reply_to=msg)


def _forwarded(op: str, msg: Message, context: Context) -> Message | None:
    """The reply of this node's warm worker (``worker=`` in the node config), or None
    when the node has none or nothing listens at its socket (the round then runs here)."""
    path = nodelink.worker_socket(context)
    if path is None:
        return None
    try:
        return nodelink.forward(path, op, msg, context)
    except nodelink.NoWorker as err:
        log.warning("%s; this round runs in the ClientApp process", err)
        return None


def _handled(op: str, msg: Message, context: Context) -> Message:
    """The reply to a train or evaluate message: the worker's, or this process's own."""
    reply = _forwarded(op, msg, context)
    if reply is not None:
        return reply
    from fedpeft import handlers

    handler = {"train": handlers.train, "burnin": handlers.burnin}.get(op, handlers.evaluate)
    return Message(handler(msg.content, context.state), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    return _handled("train", msg, context)


def evaluate(msg: Message, context: Context) -> Message:
    return _handled("evaluate", msg, context)


def burnin(msg: Message, context: Context) -> Message:
    """The burn-in before round 1 (``train.burnin``; LoRA-SB, SAM): summed gradients, top-k."""
    return _handled("burnin", msg, context)


def ray_placement(msg: Message, context: Context, call_next: Any) -> Message:
    """Client mod for simulations on a Ray cluster: each train reply names the Ray node
    and host that ran it, so that the server can show how clients spread over nodes."""
    reply: Message = call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
        import ray  # only ever loaded inside a Ray actor

        node = ray.get_runtime_context().get_node_id()
        wire.write_placement(reply.content, node, socket.gethostname())
    return reply


def client_threads(msg: Message, context: Context, call_next: Any) -> Message:
    """Client mod: in a Ray actor, torch gets as many threads as the actor holds CPUs
    (``simulation.client_cpus``); see :mod:`fedpeft.threads`. Elsewhere, a no-op."""
    threads.use_client_threads()
    reply: Message = call_next(msg, context)
    return reply


def make_client_app(mods: Sequence[Any] = (), torch_threads: bool = True) -> ClientApp:
    """fedpeft's ClientApp, optionally behind Flower client mods (taps, timers, DP).

    ``torch_threads``: first of all mods, :func:`client_threads` (benchmarks turn it off
    to measure what it changes)."""
    built = ClientApp(mods=[client_threads, *mods] if torch_threads else list(mods))
    built.query()(query)
    built.train()(train)
    built.evaluate()(evaluate)
    built.train(wire.BURNIN)(burnin)
    return built


app = make_client_app()
