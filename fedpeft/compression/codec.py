"""A whole compressed update <-> one bitstream, its scales and a small integer header.

The tensors of an update travel in the sorted order of their names (both sides know the
names: they are the adapters the server sent), so the names never cross the wire. Per
tensor the header holds its shape, k (kept entries), the Rice parameter b and the length
of its byte-aligned section of the stream (:mod:`fedpeft.compression.rice`); the scales
are one float32 each. :func:`unpack` validates everything against the shapes the server
expects before it decodes a byte, so a hostile or corrupted payload is rejected with
:class:`~fedpeft.compression.rice.CodecError` and never allocates more than the declared
(and expected) shapes allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedpeft.compression import rice
from fedpeft.compression.compeft import Ternary
from fedpeft.compression.rice import CodecError


@dataclass(frozen=True)
class Packed:
    """The wire form of an update: arrays for an ArrayRecord, ints for a ConfigRecord."""

    stream: np.ndarray  # uint8: every tensor's section, in sorted-name order
    scales: np.ndarray  # float32, one per tensor
    shapes: list[int]  # every tensor's dimensions, concatenated
    ndims: list[int]
    kept: list[int]
    rice: list[int]
    nbytes: list[int]  # length of each tensor's section of the stream


def pack(sent: dict[str, Ternary]) -> Packed:
    sections: list[np.ndarray] = []
    scales: list[float] = []
    shapes: list[int] = []
    ndims: list[int] = []
    kept: list[int] = []
    params: list[int] = []
    nbytes: list[int] = []
    for key in sorted(sent):
        t = sent[key]
        section, b = rice.encode(t.sparse)
        sections.append(section)
        scales.append(t.scale)
        shapes.extend(t.shape)
        ndims.append(len(t.shape))
        kept.append(int(t.sparse.positions.size))
        params.append(b)
        nbytes.append(int(section.size))
    stream = np.concatenate(sections) if sections else np.zeros(0, np.uint8)
    return Packed(stream, np.asarray(scales, np.float32), shapes, ndims, kept, params, nbytes)


def unpack(packed: Packed, expected: dict[str, tuple[int, ...]]) -> dict[str, Ternary]:
    """The ternary tensors of a payload, checked against the shapes the server sent."""
    keys = sorted(expected)
    n = len(keys)
    for name, values in (
        ("ndims", packed.ndims),
        ("kept", packed.kept),
        ("rice", packed.rice),
        ("nbytes", packed.nbytes),
    ):
        if len(values) != n:
            raise CodecError(f"the header lists {len(values)} '{name}' values for {n} tensors")
    if packed.scales.dtype != np.float32 or packed.scales.shape != (n,):
        raise CodecError(
            f"scales should be float32[{n}], got {packed.scales.dtype}{list(packed.scales.shape)}"
        )
    if not np.isfinite(packed.scales).all() or (packed.scales < 0).any():
        raise CodecError("a scale is negative, NaN or infinite")
    if sum(packed.ndims) != len(packed.shapes) or min(packed.ndims, default=0) < 0:
        raise CodecError("the header's shapes do not match its dimension counts")
    if min(packed.nbytes, default=0) < 0 or sum(packed.nbytes) != packed.stream.size:
        raise CodecError(
            f"section lengths sum to {sum(packed.nbytes)}, the stream has {packed.stream.size} bytes"
        )
    out: dict[str, Ternary] = {}
    dim, offset = 0, 0
    for i, key in enumerate(keys):
        shape = tuple(packed.shapes[dim : dim + packed.ndims[i]])
        dim += packed.ndims[i]
        if shape != tuple(expected[key]):
            raise CodecError(f"'{key}' is declared {list(shape)}, expected {list(expected[key])}")
        section = packed.stream[offset : offset + packed.nbytes[i]]
        offset += packed.nbytes[i]
        try:
            sparse = rice.decode(section, math.prod(shape), packed.kept[i], packed.rice[i])
        except CodecError as err:
            raise CodecError(f"'{key}': {err}") from None
        out[key] = Ternary(shape=shape, sparse=sparse, scale=float(packed.scales[i]))
    return out


def dense(sent: dict[str, Ternary]) -> dict[str, np.ndarray]:
    return {k: t.dense() for k, t in sent.items()}


def bound_bytes(sent: dict[str, Ternary]) -> float:
    """The information bound of a payload: Σ (log2 C(d, k) + k + 32) bits, in bytes."""
    return (
        sum(rice.bound_bits(t.sparse.size, t.sparse.positions.size) + 32 for t in sent.values()) / 8
    )


def payload_bytes(packed: Packed) -> int:
    """Stream plus scales: the bytes the bound is compared with."""
    return int(packed.stream.size + packed.scales.nbytes)
