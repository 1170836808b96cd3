"""ComPEFT codec: bit-exact round trip, size against the information bound, hostile input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.compression import codec, rice
from fedpeft.compression.compeft import Ternary, compress, kept_count, ternarize
from fedpeft.compression.rice import CodecError, Sparse

shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)


def _update(rng: np.random.Generator, shapes: list[tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(shapes, min_size=1, max_size=4),
    st.floats(0.001, 1.0),
    st.sampled_from(["compeft", "stc"]),
    st.integers(0, 2**32 - 1),
)
def test_round_trip_is_bit_exact(shape_list, density, scale, seed):
    update = _update(np.random.default_rng(seed), shape_list)
    sent, _ = compress(update, {}, density, scale)
    packed = codec.pack(sent)
    got = codec.unpack(packed, {k: v.shape for k, v in update.items()})
    for key, t in sent.items():
        np.testing.assert_array_equal(got[key].sparse.positions, t.sparse.positions)
        np.testing.assert_array_equal(got[key].sparse.negative, t.sparse.negative)
        assert got[key].dense().tobytes() == t.dense().tobytes()


def test_ternarize_keeps_the_top_k_with_sign_times_one_scale():
    x = np.array([0.1, -3.0, 0.5, 2.0, -0.2, 0.0], np.float32)
    t = ternarize(x, density=0.34, scale="stc")  # k = ceil(0.34 * 6) = 3
    np.testing.assert_array_equal(t.sparse.positions, [1, 2, 3])
    np.testing.assert_allclose(t.dense(), [0, -11 / 6, 11 / 6, 11 / 6, 0, 0], rtol=1e-6)
    compeft = ternarize(x, density=0.34, scale="compeft", alpha=2.0)
    assert compeft.scale == pytest.approx(2.0 * float(x.std()), rel=1e-6)


def test_ternarize_never_sends_a_zero_entry():
    """A sparse update (an embedding LoRA touches only the batch's token columns) keeps
    at most its non-zeros: a kept zero would arrive as ±scale."""
    x = np.zeros((4, 100), np.float32)
    x[:, [3, 17]] = [[1.0, -2.0]] * 4
    t = ternarize(x, density=0.5)
    assert len(t.sparse.positions) == 8
    assert set(np.flatnonzero(t.dense().any(axis=0))) == {3, 17}


def test_error_feedback_keeps_exactly_what_was_not_sent():
    rng = np.random.default_rng(0)
    update = _update(rng, [(8, 16), (16, 8)])
    residual = _update(rng, [(8, 16), (16, 8)])
    sent, new_residual = compress(update, residual, density=0.1)
    for key in update:  # sent + e_new = Δ + e_prev, entry by entry
        np.testing.assert_allclose(
            sent[key].dense() + new_residual[key], update[key] + residual[key], atol=1e-6
        )
    # over rounds nothing is lost: Σ sent + e_T = Σ Δ
    total_sent = {k: np.zeros_like(v) for k, v in update.items()}
    e: dict[str, np.ndarray] = {}
    total = {k: np.zeros_like(v) for k, v in update.items()}
    for _ in range(5):
        delta = _update(rng, [(8, 16), (16, 8)])
        out, e = compress(delta, e, density=0.05)
        for k in delta:
            total[k] += delta[k]
            total_sent[k] += out[k].dense()
    for k in total:
        np.testing.assert_allclose(total_sent[k] + e[k], total[k], atol=1e-5)


@pytest.mark.parametrize("density", [0.01, 0.03, 0.1, 0.2, 0.3])
@pytest.mark.parametrize("size", [3072, 20_000, 147_456])
def test_encoded_size_is_within_10_percent_of_the_bound(size, density):
    rng = np.random.default_rng(size)
    t = ternarize(rng.standard_normal(size).astype(np.float32), density)
    packed = codec.pack({"x": t})
    k = kept_count(size, density)
    bound = (rice.bound_bits(size, k) + 32) / 8
    assert codec.payload_bytes(packed) <= 1.10 * bound
    assert codec.payload_bytes(packed) >= bound - 1  # nothing beats the bound


def test_bound_matches_log_binomial():
    assert rice.bound_bits(10, 3) == pytest.approx(math.log2(math.comb(10, 3)) + 3)


# ------------------------------------------------------------------ hostile payloads


def _one(size=1000, density=0.1, seed=0):
    x = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    return codec.pack({"x": ternarize(x, density)}), {"x": (size,)}


def _with(packed: codec.Packed, **changes) -> codec.Packed:
    fields = {**packed.__dict__, **changes}
    return codec.Packed(**fields)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: _with(p, stream=p.stream[:-3], nbytes=[p.nbytes[0] - 3]), "truncated"),
        (
            lambda p: _with(
                p,
                stream=np.concatenate([p.stream, [0, 0]]).astype(np.uint8),
                nbytes=[p.nbytes[0] + 2],
            ),
            "after its last entry",
        ),
        (lambda p: _with(p, scales=np.array([np.nan], np.float32)), "NaN"),
        (lambda p: _with(p, scales=np.array([np.inf], np.float32)), "NaN or infinite"),
        (lambda p: _with(p, shapes=[2000]), "expected [1000]"),
        (lambda p: _with(p, kept=[1001]), "do not fit"),
        (lambda p: _with(p, rice=[99]), "outside"),
        (lambda p: _with(p, nbytes=[p.nbytes[0] + 1]), "sum to"),
        (lambda p: _with(p, kept=[2]), "exceed"),  # far more bytes than 2 entries can take
    ],
)
def test_bad_payloads_are_rejected_with_a_reason(change, reason):
    packed, expected = _one()
    with pytest.raises(CodecError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        codec.unpack(change(packed), expected)


def test_a_position_out_of_range_is_rejected():
    # one kept entry with a gap of 10 in a tensor of 5: a valid code for the wrong shape
    stream, b = rice.encode(Sparse(11, np.array([10]), np.array([False])))
    with pytest.raises(CodecError, match="out of range"):
        rice.decode(stream, 5, 1, b)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 200), st.integers(-2, 40), st.integers(0, 1200))
def test_decoder_fuzz_never_crashes_or_overallocates(data, kept, b, size):
    stream = np.frombuffer(data, dtype=np.uint8)
    try:
        sparse = rice.decode(stream, size, kept, b)
    except CodecError:
        return
    assert sparse.positions.size == kept
    assert (np.diff(sparse.positions) > 0).all()
    assert kept == 0 or (sparse.positions[0] >= 0 and sparse.positions[-1] < size)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 50), st.integers(0, 255))
def test_flipped_bits_in_a_real_payload_decode_or_fail_cleanly(seed, where, value):
    packed, expected = _one(size=500, density=0.05, seed=seed)
    stream = packed.stream.copy()
    stream[where % stream.size] = value
    try:
        out = codec.unpack(_with(packed, stream=stream), expected)
    except CodecError:
        return
    assert out["x"].dense().shape == (500,)


def test_empty_and_full_density():
    x = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    for density in (1e-9, 1.0):
        t = ternarize(x, density)
        back = codec.unpack(codec.pack({"w": t}), {"w": (2, 3)})["w"]
        assert back.dense().tobytes() == t.dense().tobytes()
    assert isinstance(t, Ternary)


def test_downlink_change_is_applied_identically_on_both_sides():
    rng = np.random.default_rng(1)
    view = _update(rng, [(4, 32), (32, 4)])
    target = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in view.items()}
    from fedpeft.compression.compeft import apply_change, downlink_change

    change = downlink_change(target, view, density=0.2)
    server_view = apply_change(view, change)
    packed = codec.pack(change)
    client_view = apply_change(view, codec.unpack(packed, {k: v.shape for k, v in view.items()}))
    assert all(server_view[k].tobytes() == client_view[k].tobytes() for k in view)
    # repeated changes converge to the target: what is not sent now is sent later
    for _ in range(60):
        server_view = apply_change(server_view, downlink_change(target, server_view, 0.2, "stc"))
    for k in view:
        assert np.abs(server_view[k] - target[k]).max() < 0.05 * np.abs(target[k] - view[k]).max()


@settings(max_examples=400, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from(["shapes", "ndims", "kept", "rice", "nbytes", "stream", "scales"]),
    st.integers(0, 7),
    st.integers(-5, 5000),
)
def test_payload_fuzz_never_crashes(seed, field, where, value):
    """One field of a valid two-tensor payload changed: decode exactly or reject."""
    rng = np.random.default_rng(seed)
    expected = {"a": (4, 30), "b": (30, 4)}
    sent, _ = compress(_update(rng, list(expected.values())), {}, 0.1)
    sent = {"a": sent["t0"], "b": sent["t1"]}
    packed = codec.pack(sent)
    if field == "stream":
        stream = packed.stream.copy()
        stream[where % stream.size] = value % 256
        packed = _with(packed, stream=stream)
    elif field == "scales":
        packed = _with(packed, scales=np.array([value, np.nan][: 1 + where % 2], np.float32))
    else:
        values = list(getattr(packed, field))
        values[where % len(values)] = value
        packed = _with(packed, **{field: values})
    try:
        out = codec.unpack(packed, expected)
    except CodecError:
        return
    assert {k: t.dense().shape for k, t in out.items()} == expected
    for t in out.values():
        assert t.sparse.positions.size <= t.sparse.size and np.isfinite(t.scale)
