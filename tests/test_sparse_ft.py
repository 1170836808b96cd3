"""Sparse fine-tuning (fedpeft/sparse_ft.py): the mean of shared-mask updates is the dense
weighted mean, every node holds the server's mask, SAM picks the largest summed
gradients, and the saved adapter is a SHiRA adapter that peft reloads exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file

from clients.app import make_client_app
from fedpeft import sparse_ft, wire
from fedpeft.aggregation import ClientUpdate, aggregate_fedit
from fedpeft.cli import simulate
from fedpeft.compression.rice import bound_bits
from fedpeft.config import ConfigError, SparseConfig, config_from_dict
from fedpeft.errors import ModelError
from fedpeft.models import adapter_state, build_peft_model, is_head, load_base_model
from fedpeft.planning import plan_clients
from fedpeft.rounds import Reply, ServerRounds
from tests.test_golden import BASE, LLAMA, with_sections
from tests.test_lora_sb import structure_tap

SPARSE = with_sections(
    BASE, peft={"method": "sparse"}, sparse={"density": 0.05}, federation={"rounds": 3}
)


def dense_delta(values: np.ndarray, positions: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape[0] * shape[1], np.float64)
    out[positions] = values
    return out.reshape(shape)


def test_the_mean_of_shared_mask_updates_is_the_dense_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    shape, k = (12, 9), 20
    positions = np.sort(rng.choice(108, k, replace=False))
    start = {"m.shira_weight": rng.standard_normal(k).astype(np.float32)}
    deltas = [{"m.shira_weight": rng.standard_normal(k).astype(np.float32)} for _ in range(5)]
    weights = [3, 9, 1, 4, 4]
    updates = [ClientUpdate(i, d, n) for i, (d, n) in enumerate(zip(deltas, weights, strict=True))]
    new = aggregate_fedit(start, updates)
    p = np.asarray(weights, np.float64) / sum(weights)
    dense_mean = sum(
        pk * dense_delta(d["m.shira_weight"], positions, shape)
        for pk, d in zip(p, deltas, strict=True)
    )
    got = dense_delta(new["m.shira_weight"] - start["m.shira_weight"], positions, shape)
    np.testing.assert_allclose(got, dense_mean, rtol=1e-6, atol=1e-7)


def test_the_servers_round_of_shared_mask_updates_is_the_dense_weighted_mean() -> None:
    """Through the server's own round (decode, validate, FedIT, server step): the new
    global S minus the old is Σ_k p_k S_k, position by position, for every matrix."""
    cfg = config_from_dict(with_sections(SPARSE, sparse={"selection": "random"}))
    fleet = plan_clients(cfg, 3)
    model = build_peft_model(cfg.model, fleet.global_lora, 3, sparse=cfg.sparse)
    nodes = {101: 0, 102: 1, 103: 2}
    rounds = ServerRounds(cfg, 3, nodes, fleet)
    start = adapter_state(model)
    modules = sparse_ft.module_names({k: v.shape for k, v in start.items()})
    shapes, kept = sparse_ft.matrix_shapes(model, modules), sparse_ft.kept(model, modules)
    positions = sparse_ft.select("random", kept, shapes, seed=1)
    values = {k: v for k, v in start.items() if not is_head(k)}
    global_state = rounds.install_structure(
        sparse_ft.mask_to_wire(positions, shapes), values, start
    )
    rounds.instructions(1, global_state, list(nodes))
    rng = np.random.default_rng(5)
    examples = {101: 24, 102: 8, 103: 16}
    updates = {
        node: {k: rng.normal(0, 1e-2, v.shape).astype(np.float32) for k, v in global_state.items()}
        for node in nodes
    }
    replies = [
        Reply(node, content=wire.encode_train_res(wire.TrainRes(u, examples[node], 0.5, 1.0)))
        for node, u in updates.items()
    ]
    new = rounds.train(1, replies)
    assert new is not None
    p = {node: n / sum(examples.values()) for node, n in examples.items()}
    for module in modules:
        key = module + sparse_ft.W_SUFFIX
        got = dense_delta(new[key] - global_state[key], positions[module], shapes[module])
        want = sum(
            p[node] * dense_delta(updates[node][key], positions[module], shapes[module])
            for node in nodes
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_sam_keeps_the_largest_summed_gradients_and_the_mask_round_trips() -> None:
    rng = np.random.default_rng(1)
    scores = {"a": rng.standard_normal((16, 8)), "b": rng.standard_normal((8, 24))}
    shapes = {"a": (16, 8), "b": (8, 24)}
    kept = {"a": 10, "b": 7}
    chosen = sparse_ft.select("sam", kept, shapes, scores=scores)
    for module, positions in chosen.items():
        flat = np.abs(scores[module]).ravel()
        assert positions.size == kept[module]
        assert flat[positions].min() >= np.delete(flat, positions).max()
    wire_mask = sparse_ft.mask_to_wire(chosen, shapes)
    back = sparse_ft.mask_from_wire(wire_mask, shapes, kept)
    assert all(np.array_equal(back[m], chosen[m]) for m in chosen)
    # the positions cost about their information bound (plus a sign bit each)
    bound = sum(bound_bits(16 * 8 if m == "a" else 8 * 24, k) for m, k in kept.items()) / 8
    assert wire_mask["stream"].nbytes <= bound + sum(kept.values()) / 8 + 8 * len(kept)
    with pytest.raises(ModelError, match="does not hold 11 positions"):
        sparse_ft.mask_from_wire(wire_mask, shapes, {"a": 11, "b": 7})
    # random and magnitude need no data, and the seed fixes random
    again = sparse_ft.select("random", kept, shapes, seed=4)
    assert all(
        np.array_equal(again[m], sparse_ft.select("random", kept, shapes, seed=4)[m]) for m in kept
    )


def test_shira_rank_follows_the_density() -> None:
    assert sparse_ft.shira_rank(0.005, 384, 384) == 1
    assert sparse_ft.shira_rank(0.05, 384, 384) == 10
    assert sparse_ft.shira_rank(1e-9, 384, 1536) == 1


@pytest.mark.parametrize("selection", ["sam", "magnitude", "random"])
def test_every_node_trains_at_the_servers_positions(tmp_path: Path, selection: str) -> None:
    seen: dict[int, list[Any]] = {}
    raw = with_sections(SPARSE, sparse={"selection": selection}, federation={"client_eval": True})
    cfg = config_from_dict(raw)
    summary = simulate(cfg, tmp_path, make_client_app([structure_tap(seen)]))
    structure = summary["structure"]
    assert structure["burnin"]["clients"] == ([0, 1, 2] if selection == "sam" else [])
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    model = build_peft_model(cfg.model, cfg.lora, 3, sparse=cfg.sparse)
    modules = sparse_ft.module_names({k: v.shape for k, v in adapter_state(model).items()})
    shapes = sparse_ft.matrix_shapes(model, modules)
    kept = sparse_ft.kept(model, modules)
    for messages in seen.values():
        assert [carried for carried, _, _ in messages] == [True] + [False] * (len(messages) - 1)
        for _, digest, held in messages:
            assert digest == structure["digest"]
            positions = sparse_ft.mask_from_wire(held, shapes, kept)
            for module in modules:
                n = shapes[module][1]
                rows, cols = saved[module + ".shira_indices"].astype(np.int64)
                np.testing.assert_array_equal(rows * n + cols, positions[module])
    rows_ = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == [] for r in rows_)
    assert any(np.abs(saved[m + ".shira_weight"]).max() > 0 for m in modules)  # it trained
    # peft rebuilds the model from the file alone, the positions included
    loaded = PeftModel.from_pretrained(load_base_model(cfg.model, 3), str(tmp_path / "adapter"))
    layer: Any = loaded.get_submodule(modules[0])
    rows, cols = layer.shira_indices["default"].numpy().astype(np.int64)
    first = saved[modules[0] + ".shira_indices"].astype(np.int64)
    np.testing.assert_array_equal(np.stack([rows, cols]), first)
    x = {"input_ids": torch.tensor([[101, 2000, 2001, 102]]), "attention_mask": torch.ones(1, 4)}
    assert torch.isfinite(loaded(**x).logits).all()


def test_a_sparse_instruction_run_exports_what_generate_loads(tmp_path: Path) -> None:
    from fedpeft.generate import Sampling, answer, load_run_model

    raw = with_sections(
        LLAMA, peft={"method": "sparse"}, sparse={"density": 0.05}, federation={"rounds": 2}
    )
    simulate(config_from_dict(raw), tmp_path)
    cfg, model = load_run_model(tmp_path)
    assert isinstance(answer(model, cfg, "Is this positive?", Sampling(max_new_tokens=3)), str)


def test_magnitude_selection_runs_under_user_level_dp(tmp_path: Path) -> None:
    raw = with_sections(
        SPARSE,
        sparse={"selection": "magnitude"},
        privacy={"mode": "user", "noise_multiplier": 0.3, "clip_norm": 1.0, "noise_seed": 2},
    )
    simulate(config_from_dict(raw), tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == [] for r in rows) and rows[-1]["epsilon"] > 0


def test_a_conv1d_model_is_refused_in_one_sentence() -> None:
    cfg = config_from_dict(
        with_sections(BASE, model={"name": "tiny-gpt2"}, peft={"method": "sparse"})
    )
    with pytest.raises(ModelError, match=r"trains torch\.nn\.Linear weights only"):
        build_peft_model(cfg.model, cfg.lora, 3, sparse=SparseConfig(targets=("c_attn",)))
    with pytest.raises(ModelError, match="has no default for a gpt2 model"):
        build_peft_model(cfg.model, cfg.lora, 3, sparse=cfg.sparse)


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"sparse": {"density": 0.0}}, "'sparse.density' should be in"),
        ({"sparse": {"selection": "fisher"}}, "'sparse.selection' should be one of"),
        ({"sparse": {"burnin_steps": 0}}, "'sparse.burnin_steps'"),
        (
            {"peft": {"method": "sparse"}, "privacy": {"mode": "user", "noise_multiplier": 1.0}},
            "outside the privacy accountant",
        ),
        ({"peft": {"method": "sparse"}, "federation": {"aggregator": "rbla"}}, "no LoRA factors"),
    ],
)
def test_sparse_mistakes_are_one_sentence(sections: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as err:
        config_from_dict(with_sections(BASE, **sections))
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
