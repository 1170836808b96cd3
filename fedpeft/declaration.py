"""A node's declaration: who it says it is, in its answer to the server's query round.

A SuperNode states its partition id and, optionally, a device profile in its node config
(``--node-config "partition-id=0 device='phone' memory-mb=150 ..."``; the keys are
listed in ``clients/app.py``). The answer is as untrusted as an update: every malformed
field is a :class:`fedpeft.wire.UpdateRejected` with one sentence, and the server leaves
that node out (:func:`fedpeft.serverrun.discovery`).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

from fedpeft import wire
from fedpeft.devices import DeviceProfile, is_positive_int, is_positive_number


def encode_profile(node_config: dict[str, object]) -> RecordDict:
    """A node's answer to the server's query: its node config (partition, profile)."""
    values = {str(k): v for k, v in node_config.items() if isinstance(v, int | float | str | bool)}
    return RecordDict({wire.CONFIG: ConfigRecord(values)})  # type: ignore[arg-type]


def decode_declaration(content: RecordDict) -> tuple[int, DeviceProfile | None]:
    """A node's answer to the query: its declared partition id (-1: none) and device
    profile. The answer is as untrusted as an update: a missing or mistyped record, like
    a malformed declaration, is an :class:`UpdateRejected`."""
    return wire.untrusted(_decode_declaration, content)


def _decode_declaration(content: RecordDict) -> tuple[int, DeviceProfile | None]:
    if wire.CONFIG not in content.config_records:
        raise wire.UpdateRejected(f"the answer lacks the '{wire.CONFIG}' config record")
    reply: dict[str, object] = dict(content.config_records[wire.CONFIG])
    return declared_partition(reply), declared_profile(reply)


# Node-config keys a SuperNode declares itself with (``--node-config "k=v ..."``).
NODE_PARTITION = "partition-id"
NODE_DEVICE = "device"
NODE_MEMORY = "memory-mb"
NODE_SPEED = "speed"
NODE_UPLINK = "uplink-mbps"
NODE_MAX_RANK = "max-rank"
DECLARED_DEVICE = "declared"  # profile name of a node that declares a budget but no name


def declared_partition(reply: dict[str, object]) -> int:
    """The partition id a node declares, or -1 (the server then picks a free one)."""
    value = reply.get(NODE_PARTITION, -1)
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def declared_profile(reply: dict[str, object]) -> DeviceProfile | None:
    """The device profile a node declares in its node config, or ``None`` if it declares
    none. ``memory-mb`` is what makes a declaration: without it the server would have no
    budget to plan for, so other profile keys without it are malformed rather than
    silently ignored. A malformed value raises :class:`UpdateRejected` (one sentence),
    since a node's config is as untrusted as its updates."""
    keys = (NODE_DEVICE, NODE_MEMORY, NODE_SPEED, NODE_UPLINK, NODE_MAX_RANK)
    if NODE_MEMORY not in reply:
        stray = [k for k in keys if k in reply]
        if stray:
            raise wire.UpdateRejected(f"the node declares {stray} but no '{NODE_MEMORY}' budget")
        return None
    name = reply.get(NODE_DEVICE, DECLARED_DEVICE)
    if not isinstance(name, str) or not name.strip():
        raise wire.UpdateRejected(f"'{NODE_DEVICE}' should be a non-empty string, got {name!r}")
    max_rank = reply.get(NODE_MAX_RANK)
    if max_rank is not None and not is_positive_int(max_rank):
        raise wire.UpdateRejected(
            f"'{NODE_MAX_RANK}' should be a positive integer, got {max_rank!r}"
        )
    return DeviceProfile(
        name=name.strip(),
        memory_mb=_positive(reply, NODE_MEMORY, None),
        speed=_positive(reply, NODE_SPEED, 1.0),
        uplink_mbps=_positive(reply, NODE_UPLINK, 10.0),
        max_rank=max_rank,
    )


def _positive(reply: dict[str, object], key: str, default: float | None) -> float:
    value = reply.get(key, default)
    if not is_positive_number(value):
        raise wire.UpdateRejected(f"'{key}' should be a positive number, got {value!r}")
    return float(value)
