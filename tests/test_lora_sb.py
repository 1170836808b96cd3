"""LoRA-SB / Fed-SB (fedpeft/lora_sb.py): the mean of the Rs is the exact mean of the
clients' ΔW, the basis is bit-identical on the server and every node and travels once per
node, training moves R alone, and the saved adapter is a plain peft LoRA adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from peft import PeftModel

from clients.app import make_client_app
from fedpeft import lora_sb, nodestate, wire
from fedpeft.aggregation import ClientUpdate, aggregate_fedit
from fedpeft.cli import simulate
from fedpeft.config import ConfigError, config_from_dict
from fedpeft.models import adapter_state, build_peft_model, load_adapter_state
from tests.test_golden import BASE, LLAMA, with_sections

SB = with_sections(BASE, peft={"method": "lora_sb"}, federation={"rounds": 3})


def random_basis(modules: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    scores = {m: rng.standard_normal(shape) for m, shape in modules.items()}
    wire_basis, initial_r = lora_sb.init_from_scores(scores, rank, eta=1e-3)
    return {"wire": wire_basis, "r": initial_r}


def test_mean_of_r_is_the_exact_mean_of_delta_w() -> None:
    modules = {"m0": (12, 10), "m1": (7, 9)}
    rank = 3
    made = random_basis(modules, rank)
    basis = lora_sb.basis_from_wire(made["wire"])
    rng = np.random.default_rng(1)
    start = {**made["r"], "head": rng.standard_normal(4).astype(np.float32)}
    deltas = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}
              for _ in range(4)]  # fmt: skip
    weights = [5, 1, 3, 8]
    updates = [ClientUpdate(i, d, n) for i, (d, n) in enumerate(zip(deltas, weights, strict=True))]
    new = aggregate_fedit(start, updates)
    p = np.asarray(weights, np.float64) / sum(weights)
    for module in modules:
        key = module + lora_sb.R_SUFFIX
        b, a = basis[module + ".B"].astype(np.float64), basis[module + ".A"].astype(np.float64)

        def w(r: np.ndarray) -> np.ndarray:
            return b @ r.astype(np.float64) @ a  # noqa: B023

        mean_dw = sum(
            pk * (w(start[key] + d[key]) - w(start[key])) for pk, d in zip(p, deltas, strict=True)
        )
        np.testing.assert_allclose(w(new[key]) - w(start[key]), mean_dw, rtol=1e-5, atol=1e-7)
        # whereas the product of separately averaged LoRA factors is not the mean product
        lora = lora_sb.to_lora({key: new[key]}, basis)
        np.testing.assert_allclose(
            lora[module + lora_sb.B_SUFFIX].astype(np.float64) @ a,
            b @ new[key] @ a,
            rtol=1e-5,
            atol=1e-7,
        )


def test_basis_is_bit_identical_after_the_wire_and_has_a_stable_digest() -> None:
    made = random_basis({"m": (16, 8)}, 4)
    sent = made["wire"]
    content = wire.encode_train_ins(
        wire.TrainIns(
            1, "{}", 2, {}, "{}", 0, structure_digest=lora_sb.digest(sent), structure=sent
        )
    )
    proto = recorddict_to_proto(content).SerializeToString()
    back = wire.decode_train_ins(recorddict_from_proto(ProtoRecordDict.FromString(proto)))
    assert back.structure is not None and back.structure_digest == lora_sb.digest(back.structure)
    for key in sent:
        assert back.structure[key].dtype == sent[key].dtype
        assert back.structure[key].tobytes() == sent[key].tobytes()
    ours, theirs = lora_sb.basis_from_wire(sent), lora_sb.basis_from_wire(back.structure)
    assert all(ours[k].tobytes() == theirs[k].tobytes() for k in ours)
    # int8 codes with one scale per column of B: within half a step of U_r
    u = made["wire"]["m.B"].astype(np.float32) * made["wire"]["m.B.scale"]
    np.testing.assert_array_equal(u, ours["m.B"])
    assert abs(np.linalg.norm(ours["m.B"], axis=0) - 1).max() < 0.05  # U_r's unit columns


def test_training_moves_r_only_and_the_carrier_reads_back_b_r_a() -> None:
    cfg = config_from_dict(SB)
    carrier = lora_sb.carrier_lora(cfg.lora)
    model = build_peft_model(cfg.model, carrier, 3)
    shapes = {k: v.shape for k, v in adapter_state(model).items()}
    made = random_basis(lora_sb.weight_shapes(shapes), carrier.r)  # type: ignore[arg-type]
    basis = lora_sb.basis_from_wire(made["wire"])
    head = {k: v for k, v in adapter_state(model).items() if ".lora_" not in k}
    sb_state = {**head, **made["r"]}
    load_adapter_state(model, lora_sb.to_lora(sb_state, basis))
    x = {"input_ids": torch.tensor([[101, 2000, 2001, 102]]), "attention_mask": torch.ones(1, 4)}
    before = model(**x).logits.detach()
    lora_sb.attach(model, sb_state, basis)
    assert torch.equal(model(**x).logits.detach(), before)  # same function, R now trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("original" in n or "classifier" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**x, labels=torch.tensor([1])).loss.backward()
    opt.step()
    trained = lora_sb.trained_r(model, sb_state)
    lora_sb.detach(model, sb_state)
    after = adapter_state(model)
    moved = 0
    for key, r in trained.items():
        module = key.removesuffix(lora_sb.R_SUFFIX)
        moved += int(not np.array_equal(r, sb_state[key]))
        np.testing.assert_array_equal(after[module + lora_sb.A_SUFFIX], basis[module + ".A"])
        np.testing.assert_allclose(
            after[module + lora_sb.B_SUFFIX], basis[module + ".B"] @ r, rtol=1e-5, atol=1e-6
        )
    assert moved == len(trained)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)


def structure_tap(seen: dict[int, list[Any]]) -> Any:
    """Client mod: per partition, whether each message carried the fixed structure (the
    basis, the mask), and the digest and structure the node holds after it."""

    def tap(msg: Message, context: Context, call_next: Any) -> Message:
        reply: Message = call_next(msg, context)
        if msg.metadata.message_type not in ("train", "evaluate") or reply.has_error():
            return reply
        ins = wire.decode_train_ins(msg.content)
        digest, held = nodestate.read_structure(context.state)
        seen.setdefault(ins.partition_id, []).append((ins.structure is not None, digest, held))
        return reply

    return tap


def test_a_run_sends_the_basis_once_per_node_and_every_node_holds_the_same(tmp_path: Path) -> None:
    seen: dict[int, list[Any]] = {}
    raw = with_sections(SB, federation={"client_eval": True})
    summary = simulate(config_from_dict(raw), tmp_path, make_client_app([structure_tap(seen)]))
    digest = summary["structure"]["digest"]
    assert sorted(summary["structure"]["burnin"]["clients"]) == [0, 1, 2]
    assert sorted(seen) == [0, 1, 2]
    reference = seen[0][0][2]
    for messages in seen.values():
        assert [carried for carried, _, _ in messages] == [True] + [False] * (len(messages) - 1)
        for _, held_digest, held in messages:
            assert held_digest == digest == lora_sb.digest(held)
            assert all(held[k].tobytes() == reference[k].tobytes() for k in reference)
    # R and the head travel: 2 layers x (query, value) x 4² + the 3-label head
    assert summary["adapter_parameters"] == 4 * 16 + (32 * 3 + 3)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == [] for r in rows)


def forgetful(partition: int, at_round: int) -> Any:
    """Client mod: partition ``partition``'s node loses its state before ``at_round``."""

    def mod(msg: Message, context: Context, call_next: Any) -> Message:
        if msg.metadata.message_type == "train":
            ins = wire.decode_train_ins(msg.content)
            if ins.partition_id == partition and ins.server_round == at_round:
                for key in list(context.state.keys()):
                    del context.state[key]
        reply: Message = call_next(msg, context)
        return reply

    return mod


def test_a_node_that_lost_the_basis_is_refused_once_and_sent_it_again(tmp_path: Path) -> None:
    simulate(config_from_dict(SB), tmp_path, make_client_app([forgetful(1, 2)]))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rows] == [[0, 1, 2], [0, 2], [0, 1, 2]]
    (reason,) = [r["reason"] for r in rows[1]["rejected"]]
    assert "holds adapter structure none" in reason


def test_the_saved_adapter_is_a_peft_lora_of_b_r_a(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from fedpeft.checkpoint import load_checkpoint
    from fedpeft.models import load_base_model

    seen: dict[int, list[Any]] = {}
    cfg = config_from_dict(SB)
    simulate(cfg, tmp_path, make_client_app([structure_tap(seen)]))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    basis = lora_sb.basis_from_wire(seen[0][0][2])
    final = load_checkpoint(tmp_path).global_state  # the Rs and the head after round 3
    modules = [k.removesuffix(lora_sb.R_SUFFIX) for k in final if k.endswith(lora_sb.R_SUFFIX)]
    assert len(modules) == 4
    for module in modules:
        np.testing.assert_array_equal(saved[module + lora_sb.A_SUFFIX], basis[module + ".A"])
        np.testing.assert_allclose(
            saved[module + lora_sb.B_SUFFIX],
            basis[module + ".B"] @ final[module + lora_sb.R_SUFFIX], rtol=1e-5, atol=1e-7,
        )  # fmt: skip
    loaded = PeftModel.from_pretrained(load_base_model(cfg.model, 3), str(tmp_path / "adapter"))
    x = {"input_ids": torch.tensor([[101, 2000, 2001, 102]]), "attention_mask": torch.ones(1, 4)}
    assert torch.isfinite(loaded(**x).logits).all()


def test_lora_sb_instruction_run_exports_what_generate_loads(tmp_path: Path) -> None:
    from fedpeft.generate import Sampling, answer, load_run_model

    raw = with_sections(LLAMA, peft={"method": "lora_sb"}, federation={"rounds": 2})
    simulate(config_from_dict(raw), tmp_path)
    cfg, model = load_run_model(tmp_path)
    text = answer(model, cfg, "Is this positive?", Sampling(max_new_tokens=3))
    assert isinstance(text, str)


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"peft": {"method": "dora"}}, "'peft.method' should be one of"),
        (
            {"peft": {"method": "lora_sb"}, "federation": {"aggregator": "flora"}},
            "no LoRA factors",
        ),
        ({"peft": {"method": "lora_sb"}, "lora": {"rank_pattern": {"query": 2}}}, "same structure"),
        ({"peft": {"method": "lora_sb"}, "privacy": {"mode": "record"}}, "not supported yet"),
        ({"lora_sb": {"score_density": 0.0}}, "'lora_sb.score_density'"),
        ({"lora_sb": {"burnin_steps": 0}}, "'lora_sb.burnin_steps'"),
        ({"lora_sb": {"init": "pissa"}}, "'lora_sb.init' should be one of"),
        (
            {"peft": {"method": "lora_sb"}, "privacy": {"mode": "user", "noise_multiplier": 1.0}},
            "outside the privacy accountant",
        ),
    ],
)
def test_lora_sb_mistakes_are_one_sentence(sections: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as err:
        config_from_dict(with_sections(BASE, **sections))
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_weights_init_needs_no_burn_in_and_learns_under_user_level_dp(tmp_path: Path) -> None:
    raw = with_sections(
        SB,
        lora_sb={"init": "weights"},
        privacy={"mode": "user", "noise_multiplier": 0.3, "clip_norm": 1.0, "noise_seed": 2},
    )
    summary = simulate(config_from_dict(raw), tmp_path)
    burnin = summary["structure"]["burnin"]
    assert burnin["clients"] == [] and burnin["uplink_bytes"] == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == [] and len(r["clients"]) == 3 for r in rows)
    assert rows[-1]["epsilon"] > 0


def test_weights_init_is_the_svd_of_w0_with_r_at_zero() -> None:
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((20, 12)).astype(np.float32)
    basis, initial_r = lora_sb.init_from_weights({"m": w0}, 3)
    u, _, vt = np.linalg.svd(w0.astype(np.float64))
    got = lora_sb.basis_from_wire(basis)
    # the same subspaces (signs may differ): |U_rᵀ B| is the identity to int8 precision
    np.testing.assert_allclose(np.abs(u[:, :3].T @ got["m.B"]), np.eye(3), atol=0.02)
    np.testing.assert_allclose(np.abs(vt[:3] @ got["m.A"].T), np.eye(3), atol=0.02)
    assert not initial_r["m.lora_R.weight"].any()


def test_resume_of_a_lora_sb_run_is_refused_in_one_sentence(tmp_path: Path) -> None:
    from fedpeft.serverrun import ServerRun

    with pytest.raises(ConfigError, match="does not continue"):
        ServerRun.prepare(config_from_dict(SB), tmp_path, True, lambda: None)  # type: ignore[arg-type,return-value]
    shutil.rmtree(tmp_path, ignore_errors=True)
