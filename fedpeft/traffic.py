"""What messages cost on the wire, counted as Flower ships them (every round's
``uplink_bytes`` and ``downlink_bytes``, docs/outputs.md)."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedpeft.wire import PACKED


def record_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower ships it: every object of its tree
    (records, arrays, array chunks), each counted once, as the object store does."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a decoded compressed reply's bitstream and scales (what the information
    bound is compared with), from the arrays' shapes: no re-encoding."""
    return sum(
        math.prod(arr.shape) * np.dtype(arr.dtype).itemsize
        for arr in content.array_records[PACKED].values()
    )
