"""FedIT aggregation with golden numbers."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.aggregation import (
    AGGREGATORS,
    ClientUpdate,
    MergesIntoBase,
    get_aggregator,
    merge_stacks,
)
from fedpeft.aggregation.fedit import aggregate_fedit
from fedpeft.config import LoraConfig


def test_weighted_mean_golden() -> None:
    g = {"w": np.array([1.0, 1.0], np.float32)}
    ups = [
        ClientUpdate(0, {"w": np.array([1.0, 0.0], np.float32)}, 1),
        ClientUpdate(1, {"w": np.array([4.0, 3.0], np.float32)}, 3),
    ]
    # 1 + (1*1 + 3*4)/4 = 4.25 ; 1 + (0 + 9)/4 = 3.25
    np.testing.assert_allclose(aggregate_fedit(g, ups)["w"], [4.25, 3.25])


def test_unowned_layers_keep_their_value() -> None:
    g = {"l0": np.ones(3, np.float32), "l1": np.full(3, 7.0, np.float32)}
    ups = [ClientUpdate(0, {"l0": np.ones(3, np.float32)}, 10)]
    out = aggregate_fedit(g, ups)
    np.testing.assert_allclose(out["l0"], 2.0)
    np.testing.assert_array_equal(out["l1"], g["l1"])


def test_fedit_error_is_the_cross_terms() -> None:
    """mean(B) mean(A) − mean(B A) = Σ_jk p_j p_k B_j A_k − Σ_k p_k B_k A_k."""
    rng = np.random.default_rng(0)
    bs = [rng.normal(size=(6, 2)) for _ in range(3)]
    as_ = [rng.normal(size=(2, 5)) for _ in range(3)]
    p = np.array([0.2, 0.3, 0.5])
    g = {"A": np.zeros((2, 5)), "B": np.zeros((6, 2))}
    ups = [ClientUpdate(k, {"A": as_[k], "B": bs[k]}, p[k]) for k in range(3)]
    out = aggregate_fedit(g, ups)
    naive = out["B"] @ out["A"]
    exact = sum(p[k] * bs[k] @ as_[k] for k in range(3))
    cross = sum(p[j] * p[k] * bs[j] @ as_[k] for j in range(3) for k in range(3) if j != k)
    diag_shrink = sum((p[k] ** 2 - p[k]) * bs[k] @ as_[k] for k in range(3))
    np.testing.assert_allclose(naive - exact, cross + diag_shrink, atol=1e-12)
    assert np.abs(naive - exact).max() > 0.1  # and it is not small


def test_registry() -> None:
    assert get_aggregator("fedit") is AGGREGATORS["fedit"]
    with pytest.raises(ValueError, match="Unknown aggregator"):
        get_aggregator("nope")


def test_server_step_scales_the_move() -> None:
    from fedpeft.aggregation import server_step

    old, agg = {"w": np.array([1.0, 2.0])}, {"w": np.array([2.0, 0.0])}
    np.testing.assert_allclose(server_step(old, agg, 2.0)["w"], [3.0, -2.0])
    assert server_step(old, agg, 1.0) is agg


# ---------------------------------------------------------------- heterogeneous ranks

ALPHA = 8.0
SCALE = LoraConfig(alpha=ALPHA, scaling="standard").scaling_for  # alpha / r
M, N = 10, 7


def _client(rng: np.random.Generator, rank: int, module: str = "m") -> dict[str, np.ndarray]:
    return {
        f"{module}.lora_A.weight": rng.normal(size=(rank, N)).astype(np.float32),
        f"{module}.lora_B.weight": rng.normal(size=(M, rank)).astype(np.float32),
    }


def _global(rank: int, modules: tuple[str, ...] = ("m",)) -> dict[str, np.ndarray]:
    out = {}
    for m in modules:
        out[f"{m}.lora_A.weight"] = np.zeros((rank, N), np.float32)
        out[f"{m}.lora_B.weight"] = np.zeros((M, rank), np.float32)
    out["classifier.weight"] = np.zeros((2, N), np.float32)
    return out


def _update(cid: int, weight: float, sent: dict, after: dict) -> ClientUpdate:
    return ClientUpdate(cid, {k: after[k] - sent[k] for k in after}, weight, sent=sent)


def _product(state: dict, module: str = "m") -> np.ndarray:
    a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
    return (ALPHA / a.shape[0]) * b.astype(np.float64) @ a


def test_flexlora_aggregate_is_the_exact_weighted_product() -> None:
    rng = np.random.default_rng(1)
    flex = AGGREGATORS["flexlora"]
    glob = _global(4)
    clients = {1: _client(rng, 1), 2: _client(rng, 2)}  # stacked rank 3 <= global rank 4
    updates = []
    for rank, after in clients.items():
        sent = flex.cut(glob, {k: v.shape for k, v in after.items()}, SCALE)
        updates.append(_update(rank, float(rank), sent, after))
    new = flex.aggregate(glob, updates, SCALE)
    expected = (1 / 3) * _product(clients[1]) + (2 / 3) * _product(clients[2])
    np.testing.assert_allclose(_product(new), expected, atol=1e-5)


def test_flexlora_cut_is_the_best_lower_rank_approximation() -> None:
    rng = np.random.default_rng(2)
    flex = AGGREGATORS["flexlora"]
    glob = _global(4)
    after = _client(rng, 4)
    full = flex.aggregate(glob, [_update(0, 1.0, glob, {**after})], SCALE)
    for rank in (1, 2, 4):
        cut = flex.cut(full, {"m.lora_A.weight": (rank, N), "m.lora_B.weight": (M, rank)}, SCALE)
        u, s, vt = np.linalg.svd(_product(after))
        np.testing.assert_allclose(_product(cut), (u[:, :rank] * s[:rank]) @ vt[:rank], atol=1e-4)


def test_depth_heterogeneous_round_only_touches_owned_layers() -> None:
    rng = np.random.default_rng(3)
    glob = _global(2, modules=("low", "high"))
    glob["low.lora_A.weight"] = rng.normal(size=(2, N)).astype(np.float32)
    for name, agg in AGGREGATORS.items():
        shallow = {**_client(rng, 2, "high"), "classifier.weight": np.ones((2, N), np.float32)}
        sent = agg.cut(glob, {k: v.shape for k, v in shallow.items()}, SCALE)
        new = agg.aggregate(glob, [_update(0, 1.0, sent, shallow)], SCALE)
        for key in ("low.lora_A.weight", "low.lora_B.weight"):
            np.testing.assert_array_equal(new[key], glob[key], err_msg=name)
        if isinstance(agg, MergesIntoBase):  # FLoRA: the update is the stack, not the state
            stack = agg.stack(glob, [_update(0, 1.0, sent, shallow)], SCALE)
            assert sorted(stack) == ["high.lora_A.weight", "high.lora_B.weight"], name
        else:
            assert not np.allclose(new["high.lora_B.weight"], 0.0), name
        np.testing.assert_allclose(new["classifier.weight"], 1.0, err_msg=name)


def _rank_one_and_two(weights: tuple[float, float], name: str) -> tuple[dict, dict]:
    """A rank-1 and a rank-2 client of one 1 × 1 module plus a head, from a zero global
    adapter, aggregated by ``name``: (the global adapter, the new one)."""
    glob = {
        "m.lora_A.weight": np.zeros((2, 1), np.float32),
        "m.lora_B.weight": np.zeros((1, 2), np.float32),
        "head": np.zeros(1, np.float32),
    }
    small = {
        "m.lora_A.weight": np.array([[2.0]], np.float32),
        "m.lora_B.weight": np.array([[4.0]], np.float32),
        "head": np.array([1.0], np.float32),
    }
    big = {
        "m.lora_A.weight": np.array([[1.0], [3.0]], np.float32),
        "m.lora_B.weight": np.array([[2.0, 6.0]], np.float32),
        "head": np.array([4.0], np.float32),
    }
    agg = AGGREGATORS[name]
    ups = [
        _update(0, weights[0], agg.cut(glob, {k: v.shape for k, v in small.items()}, SCALE), small),
        _update(1, weights[1], glob, big),
    ]
    return glob, agg.aggregate(glob, ups, SCALE)


def test_zero_pad_golden() -> None:
    _, new = _rank_one_and_two((1.0, 1.0), "zero_pad")
    # padded mean: A = ([2, 0] + [1, 3]) / 2, B = ([4, 0] + [2, 6]) / 2
    np.testing.assert_allclose(new["m.lora_A.weight"].ravel(), [1.5, 1.5])
    np.testing.assert_allclose(new["m.lora_B.weight"].ravel(), [3.0, 3.0])


def test_rbla_averages_each_component_over_its_owners() -> None:
    _, new = _rank_one_and_two((1.0, 3.0), "rbla")
    # component 0: (1·2 + 3·1) / 4 and (1·4 + 3·2) / 4; component 1 only the big client's
    # (FedIT would give it 3·3 / 4 and 3·6 / 4); the head over both
    np.testing.assert_allclose(new["m.lora_A.weight"].ravel(), [1.25, 3.0])
    np.testing.assert_allclose(new["m.lora_B.weight"].ravel(), [2.5, 6.0])
    np.testing.assert_allclose(new["head"], [3.25])
    _, fedit = _rank_one_and_two((1.0, 3.0), "fedit")
    np.testing.assert_allclose(fedit["m.lora_A.weight"].ravel(), [1.25, 2.25])


def test_rbla_is_fedit_at_equal_ranks_and_keeps_what_nobody_trained() -> None:
    rng = np.random.default_rng(0)
    glob = {
        "a.lora_A.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "b.lora_A.weight": np.ones((3, 4), np.float32),
    }
    ups = [
        _update(
            k, float(k + 1), glob, {"a.lora_A.weight": rng.normal(size=(3, 4)).astype(np.float32)}
        )
        for k in range(3)
    ]
    new = AGGREGATORS["rbla"].aggregate(glob, ups, SCALE)
    np.testing.assert_allclose(
        new["a.lora_A.weight"], aggregate_fedit(glob, ups)["a.lora_A.weight"], rtol=1e-6
    )
    np.testing.assert_array_equal(new["b.lora_A.weight"], glob["b.lora_A.weight"])


def _rank_r_global(rng: np.random.Generator, rank: int) -> dict[str, np.ndarray]:
    """A non-zero global adapter in FlexLoRA's SVD form (as after any aggregation)."""
    flex = AGGREGATORS["flexlora"]
    start = _client(rng, rank)
    return flex.aggregate(_global(rank), [_update(0, 1.0, _global(rank), start)], SCALE)


def test_flexlora_low_rank_client_with_no_change_leaves_the_global_unchanged() -> None:
    """FlexLoRA's eq. 4 would replace W by the client's rank-1 cut; the update form keeps W."""
    rng = np.random.default_rng(4)
    flex = AGGREGATORS["flexlora"]
    glob = _rank_r_global(rng, 4)
    sent = flex.cut(glob, {"m.lora_A.weight": (1, N), "m.lora_B.weight": (M, 1)}, SCALE)
    new = flex.aggregate(glob, [_update(0, 1.0, sent, dict(sent))], SCALE)
    np.testing.assert_allclose(_product(new), _product(glob), atol=1e-5)
    assert np.linalg.matrix_rank(_product(new), tol=1e-6) == 4


def test_flexlora_adds_each_clients_exact_product_change() -> None:
    """W' = W + Σ_k p_k (s_k B'_k A'_k − s_k B_k A_k), ranks 1, 2 and the full 4."""
    rng = np.random.default_rng(5)
    flex = AGGREGATORS["flexlora"]
    glob = _rank_r_global(rng, 4)
    updates, change = [], np.zeros((M, N))
    for cid, (rank, weight) in enumerate([(1, 2.0), (2, 1.0), (4, 1.0)]):
        sent = flex.cut(glob, {"m.lora_A.weight": (rank, N), "m.lora_B.weight": (M, rank)}, SCALE)
        after = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in sent.items()}
        updates.append(_update(cid, weight, sent, after))
        change += (weight / 4.0) * (_product(after) - _product(sent))
    new = flex.aggregate(glob, updates, SCALE)
    expected = _product(glob) + change  # rank up to 10; the global keeps its best rank 4
    u, s, vt = np.linalg.svd(expected)
    np.testing.assert_allclose(_product(new), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)


# ---------------------------------------------------------------- FLoRA (stacking)


def test_flora_stack_is_the_exact_weighted_product_and_adapters_restart() -> None:
    rng = np.random.default_rng(6)
    flora = AGGREGATORS["flora"]
    glob = _global(4, modules=("low", "high"))
    glob["high.lora_A.weight"] = rng.normal(size=(4, N)).astype(np.float32)  # the restart A
    clients = [(1, 3.0, ("high",)), (2, 1.0, ("low", "high")), (4, 4.0, ("high",))]
    updates, expected = [], {"low": np.zeros((M, N)), "high": np.zeros((M, N))}
    owners = {"low": 1.0, "high": 8.0}  # Σ weights of the clients that own each module
    for cid, (rank, weight, modules) in enumerate(clients):
        after = {k: v for m in modules for k, v in _client(rng, rank, m).items()}
        sent = flora.cut(glob, {k: v.shape for k, v in after.items()}, SCALE)
        updates.append(_update(cid, weight, sent, after))
        for m in modules:
            expected[m] += (weight / owners[m]) * _product(after, m)
    stack = flora.stack(glob, updates, SCALE)
    assert stack["high.lora_A.weight"].shape == (1 + 2 + 4, N)  # nothing truncated
    for m in ("low", "high"):
        merged = merge_stacks({}, [stack])[m]
        np.testing.assert_allclose(merged, expected[m], rtol=1e-5, atol=1e-5)
    new = flora.aggregate(glob, updates, SCALE)
    for key in ("high.lora_A.weight", "high.lora_B.weight", "low.lora_B.weight"):
        np.testing.assert_array_equal(new[key], glob[key])  # every round restarts from here


def test_merge_stacks_accumulates_rounds() -> None:
    b, a = np.ones((M, 1), np.float32), np.full((1, N), 2.0, np.float32)
    stack = {"m.lora_B.weight": b, "m.lora_A.weight": a}
    merged = merge_stacks(merge_stacks({}, [stack]), [stack, stack], scale=0.5)
    np.testing.assert_allclose(merged["m"], 2.0 + 0.5 * 2 * 2.0)


@pytest.mark.parametrize("rule", ["standard", "rslora", "fixed"])
def test_flexlora_is_exact_under_every_scaling_rule(rule: str) -> None:
    """Σ p_k s(r_k) B_k A_k is aggregated exactly, and each cut is the best rank-r
    approximation under s(r), whatever the rule."""
    scale = LoraConfig(r=4, alpha=ALPHA, scaling=rule).scaling_for

    def product(state: dict[str, np.ndarray]) -> np.ndarray:
        a, b = state["m.lora_A.weight"], state["m.lora_B.weight"]
        return scale(a.shape[0]) * b.astype(np.float64) @ a

    rng = np.random.default_rng(7)
    flex = AGGREGATORS["flexlora"]
    glob = _global(4)
    clients = {1: _client(rng, 1), 2: _client(rng, 2)}
    updates = [
        _update(r, float(r), flex.cut(glob, {k: v.shape for k, v in c.items()}, scale), c)
        for r, c in clients.items()
    ]
    new = flex.aggregate(glob, updates, scale)
    expected = (1 / 3) * product(clients[1]) + (2 / 3) * product(clients[2])
    np.testing.assert_allclose(product(new), expected, atol=1e-5)
    u, s, vt = np.linalg.svd(expected)
    cut = flex.cut(new, {"m.lora_A.weight": (2, N), "m.lora_B.weight": (M, 2)}, scale)
    np.testing.assert_allclose(product(cut), (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_robust_aggregators_ignore_one_attacker_the_mean_follows(name: str) -> None:
    """Five clients: four agree on a rank-1 product change, one sends it ×1000 and
    negated, and claims 100× the examples. Median and 20%-trimmed mean (one dropped at
    each end of five) move W by the honest change exactly; FlexLoRA's weighted mean
    follows the attacker."""
    rng = np.random.default_rng(4)
    glob = _global(2)
    honest = _client(rng, 2)
    hostile = {k: (-1000.0 * v if "lora_B" in k else v) for k, v in honest.items()}
    agg = AGGREGATORS[name]
    shapes = {k: v.shape for k, v in honest.items()}
    sent = agg.cut(glob, shapes, SCALE)
    honest["classifier.weight"] = np.ones((2, N), np.float32)
    hostile["classifier.weight"] = np.full((2, N), -1e6, np.float32)
    sent["classifier.weight"] = glob["classifier.weight"]
    ups = [_update(k, 1.0, sent, honest) for k in range(4)] + [_update(4, 100.0, sent, hostile)]
    new = agg.aggregate(glob, ups, SCALE)
    np.testing.assert_allclose(_product(new), _product(honest), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["classifier.weight"], 1.0)
    mean = AGGREGATORS["flexlora"].aggregate(glob, ups, SCALE)
    assert np.abs(_product(mean) - _product(honest)).max() > 100 * np.abs(_product(honest)).max()


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    from fedpeft.aggregation.robust import trimmed_mean

    stack = np.array([[1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])
    np.testing.assert_allclose(trimmed_mean(0.2)(stack), [3.0, 1.0])  # mean of the middle 3
