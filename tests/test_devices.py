"""Device planning: LEGEND-style depth/ranks and a memory estimate checked against a real step."""

from __future__ import annotations

import pytest

from fedpeft.config import LoraConfig, ModelConfig
from fedpeft.devices import (
    AdapterPlan,
    ModelShape,
    estimate_memory_bytes,
    layer_ranks,
    plan_for_budget,
    trainable_params,
)
from fedpeft.memory import measure_step_memory
from fedpeft.models import build_peft_model, model_shape
from fedpeft.train import Encoded, collate

SHAPE = ModelShape(
    num_layers=6, hidden=384, intermediate=1536, num_heads=12, base_params=22_700_000,
    modules_per_layer=2, module_in=384, module_out=384, head_params=770,
)  # fmt: skip


@pytest.mark.parametrize(
    ("depth", "top", "expected"),
    [
        (6, 8, (4, 4, 4, 8, 8, 8)),
        (3, 16, (0, 0, 0, 8, 16, 16)),
        (2, 4, (0, 0, 0, 0, 2, 4)),
        (1, 8, (0, 0, 0, 0, 0, 8)),
    ],
)
def test_layer_ranks_top_layers_non_decreasing(
    depth: int, top: int, expected: tuple[int, ...]
) -> None:
    ranks = layer_ranks(6, depth, top)
    assert ranks == expected
    assert list(ranks) == sorted(ranks)


def test_trainable_params_golden() -> None:
    # MiniLM q,v at rank 8 on all 6 layers + classifier: 6 * 2 * 8 * (384 + 384) + 770
    assert trainable_params(SHAPE, AdapterPlan(6, (8,) * 6)) == 74_498


def test_planner_fits_the_budget_and_shrinks_with_it() -> None:
    plans = []
    for budget_mb in (400, 200, 150, 120):
        plan = plan_for_budget(SHAPE, budget_mb * 2**20, batch=16, seq_len=64, max_rank=16)
        assert plan is not None
        assert estimate_memory_bytes(SHAPE, plan, 16, 64) <= budget_mb * 2**20
        plans.append(plan)
    depths = [p.depth for p in plans]
    assert depths == sorted(depths, reverse=True) and depths[0] == 6 and depths[-1] < 6
    assert plan_for_budget(SHAPE, 50 * 2**20, 16, 64, 16) is None  # below the weights alone


@pytest.mark.parametrize(
    ("name", "task", "depth", "batch", "seq"),
    [
        ("tiny-bert", "classification", 1, 8, 32),
        ("tiny-bert", "classification", 2, 16, 64),
        ("tiny-gpt2", "causal_lm", 2, 8, 48),
    ],
)
def test_estimate_within_25_percent_of_a_measured_step(
    name: str, task: str, depth: int, batch: int, seq: int
) -> None:
    mc = ModelConfig(name=name, task=task)
    ranks = layer_ranks(2, depth, 8)
    plan = AdapterPlan(depth, ranks)
    pattern = {f"layer.{i}.": r for i, r in enumerate(ranks) if r} if name == "tiny-bert" else {}
    lora = LoraConfig(r=8, layers_to_transform=plan.layers, rank_pattern=pattern)
    model = build_peft_model(mc, lora, 2)
    data = Encoded([[101, *range(2000, 2000 + seq - 2), 102]] * batch, [0] * batch)
    measured = sum(measure_step_memory(model, collate(data, list(range(batch)), 0, task)).values())
    estimate = estimate_memory_bytes(model_shape(mc, lora, 2), plan, batch, seq)
    print(
        f"{name} depth {depth}: estimate {estimate / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB"
    )
    assert abs(estimate - measured) <= 0.25 * measured


def test_profiles_assignment_and_bad_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.config import ConfigError
    from fedpeft.devices import DeviceProfile, assign_profiles, load_profile

    profiles = {"a": DeviceProfile("a", 100), "b": DeviceProfile("b", 200)}
    fleet = assign_profiles(profiles, {"a": 2, "b": 3}, seed=0)
    assert sorted(p.name for p in fleet) == ["a", "a", "b", "b", "b"]
    assert fleet == assign_profiles(profiles, {"a": 2, "b": 3}, seed=0)
    with pytest.raises(ConfigError, match="unknown profile"):
        assign_profiles(profiles, {"c": 1}, seed=0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmemory_mb: -5\n")
    with pytest.raises(ConfigError, match="should be positive numbers"):
        load_profile(str(bad))
    with pytest.raises(ConfigError, match="cannot be read"):
        load_profile(str(tmp_path / "absent.yaml"))


def test_lora_for_plan_gives_peft_the_ranks() -> None:
    from fedpeft.devices import lora_for_plan
    from fedpeft.models import adapter_state

    plan = AdapterPlan(2, (2, 4))
    lora = lora_for_plan(LoraConfig(target_modules=("query", "value")), plan, "bert")
    state = adapter_state(build_peft_model(ModelConfig(name="tiny-bert"), lora, 2))
    ranks = {k.split(".lora_")[0]: v.shape for k, v in state.items() if "lora_A" in k}
    assert {s[0] for k, s in ranks.items() if ".layer.0." in k} == {2}
    assert {s[0] for k, s in ranks.items() if ".layer.1." in k} == {4}
