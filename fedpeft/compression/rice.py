"""Positions and signs of a sparse ternary tensor as one byte-aligned bitstream.

A tensor of d entries with k kept is sent as the k gaps g_i ≥ 0 between kept positions
(the number of dropped entries before each kept one), Golomb-Rice coded (Golomb, 1966;
Rice, 1979) with parameter b: the quotient g >> b in unary, then the b low bits. The
stream is laid out in three sections so both directions are vectorized numpy:

    [ k unary quotients: q_i zeros then a one ][ k × b remainder bits ][ k sign bits ]

padded with zeros to a whole byte. For positions drawn uniformly (gaps ≈ geometric with
p = k/d) the best b costs within a few hundredths of a bit per gap of the entropy, so the
stream is close to the information bound log2 C(d, k) + k bits (:func:`bound_bits`).

:func:`decode` trusts nothing: it checks the stream's length against what the header
allows *before* unpacking it (memory stays bounded by the declared shape), and rejects a
truncated stream, trailing data, non-zero padding and positions beyond d, each with
:class:`CodecError` and a one-sentence reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_RICE = 31  # gaps of a tensor with < 2**31 entries never need a larger parameter


class CodecError(ValueError):
    """A bitstream that is not a valid encoding of its declared shape; says why."""


@dataclass(frozen=True)
class Sparse:
    """Sorted kept positions (int64) and their signs (True = negative) in a d-entry tensor."""

    size: int
    positions: np.ndarray
    negative: np.ndarray


def bound_bits(size: int, kept: int) -> float:
    """log2 C(d, k) + k: the fewest bits that name k of d positions and their signs."""
    log2_choose = math.lgamma(size + 1) - math.lgamma(kept + 1) - math.lgamma(size - kept + 1)
    return log2_choose / math.log(2) + kept


def gaps(positions: np.ndarray) -> np.ndarray:
    """Dropped entries before each kept position (positions sorted, distinct)."""
    return np.diff(positions, prepend=-1) - 1


def best_rice(gap: np.ndarray) -> int:
    """The Rice parameter b that makes these gaps' code shortest (exact, not estimated)."""
    if gap.size == 0:
        return 0
    top = int(gap.max()).bit_length()
    lengths = [int((gap >> b).sum()) + gap.size * b for b in range(top + 1)]
    return int(np.argmin(lengths))


def stream_bits(gap: np.ndarray, b: int) -> int:
    """Bits of the stream before padding: unary quotients, remainders and signs."""
    return int((gap >> b).sum()) + gap.size * (b + 2)


def encode(sparse: Sparse) -> tuple[np.ndarray, int]:
    """The uint8 stream of a sparse sign tensor and its Rice parameter b."""
    gap = gaps(sparse.positions)
    b = best_rice(gap)
    k = gap.size
    quotient = gap >> b
    unary_bits = int(quotient.sum()) + k
    bits = np.zeros(stream_bits(gap, b), dtype=np.uint8)
    bits[np.cumsum(quotient + 1) - 1] = 1  # each quotient's terminating one
    if b:
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        remainder = (gap[:, None] >> shifts) & 1
        bits[unary_bits : unary_bits + k * b] = remainder.ravel()
    bits[unary_bits + k * b :] = sparse.negative
    return np.packbits(bits), b


def max_stream_bytes(size: int, kept: int, b: int) -> int:
    """The longest valid stream for this header: the gaps sum to at most d − k, so the
    quotients sum to at most (d − k) >> b."""
    return math.ceil((((size - kept) >> b) + kept * (b + 2)) / 8)


def decode(stream: np.ndarray, size: int, kept: int, b: int) -> Sparse:
    """Positions and signs from a stream, validated against d = ``size`` and k = ``kept``."""
    if not 0 <= kept <= size:
        raise CodecError(f"{kept} kept entries do not fit a tensor of {size}")
    if not 0 <= b <= MAX_RICE:
        raise CodecError(f"Rice parameter {b} is outside 0..{MAX_RICE}")
    if stream.dtype != np.uint8 or stream.ndim != 1:
        raise CodecError(
            f"the bitstream should be 1-d uint8, got {stream.dtype}{list(stream.shape)}"
        )
    if stream.size > max_stream_bytes(size, kept, b):
        raise CodecError(
            f"{stream.size} bytes exceed the {max_stream_bytes(size, kept, b)} that "
            f"{kept} of {size} entries can take"
        )
    bits = np.unpackbits(stream)
    ones = np.flatnonzero(bits)
    if ones.size < kept:
        raise CodecError("the bitstream is truncated (fewer unary codes than kept entries)")
    ends = ones[:kept]  # the k-th one closes the unary section
    unary_bits = int(ends[-1]) + 1 if kept else 0
    used = unary_bits + kept * (b + 1)
    if used > bits.size:
        raise CodecError(f"the bitstream is truncated ({bits.size} bits, {used} needed)")
    if bits.size - used >= 8 or bits[used:].any():
        raise CodecError("the bitstream has data after its last entry")
    quotient = np.diff(ends, prepend=-1) - 1
    remainder = np.zeros(kept, dtype=np.int64)
    if b:
        block = bits[unary_bits : unary_bits + kept * b].reshape(kept, b).astype(np.int64)
        remainder = block @ (np.int64(1) << np.arange(b - 1, -1, -1, dtype=np.int64))
    positions = np.cumsum((quotient << b) + remainder + 1) - 1
    if kept and positions[-1] >= size:
        raise CodecError(f"a position ({int(positions[-1])}) is out of range for {size} entries")
    negative = bits[unary_bits + kept * b : used].astype(bool)
    return Sparse(size=size, positions=positions, negative=negative)
