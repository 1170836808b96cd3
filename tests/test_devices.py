"""Device planning: LEGEND-style depth/ranks and a memory estimate checked against a real step."""

from __future__ import annotations

import pytest

from fedpeft import declaration
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
        ("tiny-llama", "causal_lm", 2, 8, 48),
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


# ---------------------------------------------------------------- declared device profiles
def _tiny_cfg(*overrides: str):  # type: ignore[no-untyped-def]
    from fedpeft.config import load_config

    tiny = [
        "model.name=tiny-bert", "model.max_length=32", "lora.r=4",
        "data.synthetic_samples=200", "partition.num_clients=2", "partition.scheme=iid",
    ]  # fmt: skip
    return load_config("configs/quickstart.yaml", [*tiny, *overrides])


def test_a_node_declares_its_profile_in_its_node_config() -> None:
    from fedpeft.devices import DeviceProfile

    reply = {"partition-id": 0, "device": "phone", "memory-mb": 150, "speed": 0.5,
             "uplink-mbps": 5, "max-rank": 2}  # fmt: skip
    assert declaration.declared_profile(reply) == DeviceProfile("phone", 150.0, 0.5, 5.0, 2)
    assert declaration.declared_partition(reply) == 0
    # only the budget: defaults for the rest, as in a profile YAML
    assert declaration.declared_profile({"memory-mb": 64.5}) == DeviceProfile("declared", 64.5)
    # Flower's simulation node config declares no profile
    assert declaration.declared_profile({"partition-id": 1, "num-partitions": 2}) is None
    assert declaration.declared_partition({"partition-id": "1"}) == -1
    assert declaration.declared_partition({}) == -1


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        ({"memory-mb": -5}, "'memory-mb' should be a positive number"),
        ({"memory-mb": "150"}, "'memory-mb' should be a positive number"),
        ({"memory-mb": True}, "'memory-mb' should be a positive number"),
        ({"memory-mb": float("nan")}, "'memory-mb' should be a positive number"),
        ({"memory-mb": 150, "speed": 0}, "'speed' should be a positive number"),
        ({"memory-mb": 150, "uplink-mbps": "fast"}, "'uplink-mbps' should be a positive"),
        ({"memory-mb": 150, "max-rank": 0}, "'max-rank' should be a positive integer"),
        ({"memory-mb": 150, "max-rank": 2.5}, "'max-rank' should be a positive integer"),
        ({"memory-mb": 150, "device": 3}, "'device' should be a non-empty string"),
        ({"device": "phone", "speed": 0.5}, "but no 'memory-mb' budget"),
    ],
)
def test_a_malformed_declaration_is_one_sentence(reply: dict[str, object], fragment: str) -> None:
    from fedpeft import wire

    with pytest.raises(wire.UpdateRejected, match=fragment) as info:
        declaration.declared_profile(reply)
    assert str(info.value).count(". ") == 0 and "\n" not in str(info.value)


def _shapes_cover(big: dict[str, tuple[int, ...]], small: dict[str, tuple[int, ...]]) -> bool:
    return set(small) <= set(big) and all(
        all(b >= s for b, s in zip(big[k], small[k], strict=True)) for k in small
    )


def _top_rank(lora: LoraConfig) -> int:
    return max(lora.rank_pattern.values(), default=lora.r)


def test_declared_profiles_next_to_uniform_clients() -> None:
    from fedpeft.devices import DeviceProfile
    from fedpeft.models import adapter_shapes
    from fedpeft.planning import plan_clients

    cfg = _tiny_cfg()
    fleet = plan_clients(cfg, 2, {0: DeviceProfile("phone", 5, max_rank=2)})
    assert fleet.profile_names == {0: "phone", 1: "uniform"}
    phone, uniform = fleet.client_loras[0], fleet.client_loras[1]
    assert phone.layers_to_transform == (1,) and _top_rank(phone) == 2  # top layer, capped
    assert uniform == cfg.lora  # an undeclared client keeps the config's lora as it is
    glob = adapter_shapes(cfg.model, fleet.global_lora, 2)
    for lora in (phone, uniform):
        assert _shapes_cover(glob, adapter_shapes(cfg.model, lora, 2))
    assert plan_clients(cfg, 2).global_lora == cfg.lora  # nothing declared: as before


def test_a_declared_profile_overrides_the_fleet_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.devices import DeviceProfile
    from fedpeft.models import adapter_shapes
    from fedpeft.planning import plan_clients

    (tmp_path / "small.yaml").write_text("name: small\nmemory_mb: 5\nmax_rank: 1\n")
    cfg = _tiny_cfg(f"fleet.profiles=['{tmp_path / 'small.yaml'}']", "fleet.mix={small: 2}")
    assert plan_clients(cfg, 2).profile_names == {0: "small", 1: "small"}
    fleet = plan_clients(cfg, 2, {1: DeviceProfile("workstation", 64)})
    assert fleet.profile_names == {0: "small", 1: "workstation"}
    small, big = fleet.client_loras[0], fleet.client_loras[1]
    assert (small.layers_to_transform, _top_rank(small)) == ((1,), 1)
    assert big.layers_to_transform == (0, 1) and _top_rank(big) == 16  # the fleet's max_rank
    # the global adapter holds the declared (highest) ranks on every layer
    glob = adapter_shapes(cfg.model, fleet.global_lora, 2)
    assert glob == adapter_shapes(cfg.model, big, 2)
    assert _shapes_cover(glob, adapter_shapes(cfg.model, small, 2))


def test_a_declared_profile_too_small_leaves_only_that_node_out() -> None:
    from fedpeft.config import ConfigError
    from fedpeft.devices import DeviceProfile
    from fedpeft.planning import plan_clients

    cfg = _tiny_cfg()
    fleet = plan_clients(cfg, 2, {0: DeviceProfile("toaster", 1), 1: DeviceProfile("pc", 64)})
    assert set(fleet.client_loras) == {1} and set(fleet.left_out) == {0}
    assert "'toaster' (1 MiB) cannot train even one adapted layer" in fleet.left_out[0]
    with pytest.raises(ConfigError, match="No client can train"):
        plan_clients(cfg, 2, {0: DeviceProfile("toaster", 1), 1: DeviceProfile("kettle", 2)})


def test_the_server_leaves_a_malformed_declaration_out_with_a_warning(caplog) -> None:  # type: ignore[no-untyped-def]
    from fedpeft import wire
    from fedpeft.devices import DeviceProfile
    from fedpeft.serverrun import read_declaration

    def answer(values: dict[str, object]) -> wire.RecordDict:
        return declaration.encode_profile(values)

    assert read_declaration(7, answer({"partition-id": 1, "memory-mb": 64})) == (
        1,
        DeviceProfile("declared", 64.0),
    )
    assert read_declaration(8, answer({"partition-id": 0})) == (0, None)
    with caplog.at_level("WARNING", logger="fedpeft"):
        assert read_declaration(9, answer({"partition-id": 0, "memory-mb": 0})) is None
        # an answer without the record (it crashed discovery: KeyError 'fedpeft')
        assert read_declaration(10, wire.RecordDict({})) is None
    assert "node 9 declares a malformed device profile" in caplog.text
    assert "'memory-mb' should be a positive number, got 0" in caplog.text
    assert "node 10 declares a malformed device profile" in caplog.text
    assert "lacks the 'fedpeft' config record" in caplog.text


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("standard", {2: 8.0, 4: 4.0}),
        ("rslora", {2: 16 / 2**0.5, 4: 8.0}),
        ("fixed", {2: 2.0, 4: 2.0}),
    ],
)
def test_lora_scaling_rule_is_what_peft_applies(rule: str, expected: dict[int, float]) -> None:
    """Each adapted module of a mixed-rank plan is scaled by s(r) of ``lora.scaling``
    (fixed: alpha / lora.r = 16 / 8 at every rank)."""
    from fedpeft.devices import lora_for_plan

    base = LoraConfig(r=8, alpha=16, target_modules=("query", "value"), scaling=rule)
    lora = lora_for_plan(base, AdapterPlan(2, (2, 4)), "bert")
    model = build_peft_model(ModelConfig(name="tiny-bert"), lora, 2)
    for name, module in model.named_modules():
        if name.endswith(("query", "value")) and hasattr(module, "scaling"):
            rank = module.r["default"]
            assert module.scaling["default"] == pytest.approx(expected[rank]), name
            assert base.scaling_for(rank) == pytest.approx(expected[rank])


@pytest.mark.parametrize("policy", ["adapt", "bucket", "exclude"])
def test_the_fleet_policy_decides_what_each_device_trains(tmp_path, policy: str) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.models import adapter_shapes
    from fedpeft.planning import plan_clients

    (tmp_path / "small.yaml").write_text("name: small\nmemory_mb: 5\nmax_rank: 1\n")
    (tmp_path / "big.yaml").write_text("name: big\nmemory_mb: 64\n")
    profiles = f"fleet.profiles=['{tmp_path / 'small.yaml'}', '{tmp_path / 'big.yaml'}']"
    cfg = _tiny_cfg(profiles, "fleet.mix={small: 1, big: 1}", f"fleet.policy={policy}")
    fleet = plan_clients(cfg, 2)
    # the devices are assigned to partitions as under 'adapt' (seeded)
    adapted = plan_clients(_tiny_cfg(profiles, "fleet.mix={small: 1, big: 1}"), 2)
    small = next(p for p, n in adapted.profile_names.items() if n == "small")
    big = 1 - small
    if policy == "adapt":  # each its own: the top layer at rank 1, both layers up to 16
        assert fleet.client_loras[small].layers_to_transform == (1,)
        assert _top_rank(fleet.client_loras[big]) == 16
    if policy == "bucket":  # both at what the small device affords
        assert fleet.client_loras[small] == fleet.client_loras[big]
        assert fleet.client_loras[big].layers_to_transform == (1,)
        assert _top_rank(fleet.client_loras[big]) == 1
    if policy == "exclude":  # the lora section (r=4 on both layers) where it fits
        assert set(fleet.client_loras) == {big}
        assert "'fleet.policy' is 'exclude'" in fleet.left_out[small]
        shapes = adapter_shapes(cfg.model, fleet.client_loras[big], 2)
        assert shapes == adapter_shapes(cfg.model, cfg.lora, 2)
    else:
        assert fleet.left_out == {}


def test_an_excluded_device_never_trains(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from fedpeft.cli import simulate

    (tmp_path / "small.yaml").write_text("name: small\nmemory_mb: 5\nmax_rank: 1\n")
    (tmp_path / "big.yaml").write_text("name: big\nmemory_mb: 64\n")
    profiles = f"fleet.profiles=['{tmp_path / 'small.yaml'}', '{tmp_path / 'big.yaml'}']"
    cfg = _tiny_cfg(
        profiles, "fleet.mix={small: 2, big: 1}", "fleet.policy=exclude",
        "partition.num_clients=3", "federation.min_clients=1", "federation.rounds=2",
        "train.local_steps=1", "simulation.runtime=inprocess",
    )  # fmt: skip
    summary = simulate(cfg, tmp_path / "out")
    assert len(summary["left_out"]) == 2
    (kept,) = (int(p) for p in summary["client_plans"])
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rows] == [[kept], [kept]]


def test_the_skewed_assignment_gives_the_weakest_devices_the_most_of_one_label() -> None:
    from fedpeft.devices import DeviceProfile, skewed_assignment

    weak, mid, strong = (
        DeviceProfile(n, m) for n, m in (("weak", 50), ("mid", 100), ("strong", 400))
    )
    fleet = skewed_assignment([strong, weak, mid, strong], label_counts=[5, 90, 0, 40])
    assert [p.name for p in fleet] == ["strong", "weak", "strong", "mid"]


@pytest.mark.parametrize("assign", ["shuffled", "skewed"])
def test_fleet_assign_ties_capacity_to_labels_only_when_asked(tmp_path, assign: str) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.data import partition_label_counts
    from fedpeft.planning import format_clients, plan_clients

    (tmp_path / "small.yaml").write_text("name: small\nmemory_mb: 5\nmax_rank: 1\n")
    (tmp_path / "big.yaml").write_text("name: big\nmemory_mb: 64\n")
    profiles = f"fleet.profiles=['{tmp_path / 'small.yaml'}', '{tmp_path / 'big.yaml'}']"
    skew = ["partition.num_clients=4", "partition.scheme=dirichlet", "partition.alpha=0.3"]
    cfg = _tiny_cfg(profiles, "fleet.mix={small: 2, big: 2}", f"fleet.assign={assign}", *skew)
    names = plan_clients(cfg, cfg.data.synthetic_classes).profile_names
    counts = partition_label_counts(cfg, label=0)
    small = sorted(counts[p] for p, n in names.items() if n == "small")
    big = sorted(counts[p] for p, n in names.items() if n == "big")
    if assign == "skewed":
        assert min(small) >= max(big) and sum(small) > sum(big)
        assert "examples of label 0): small" in format_clients(cfg)
    else:  # this seed's shuffle happens not to follow the labels
        assert sorted(small + big)[-2:] != small


def test_a_skewed_assignment_without_a_mix_is_one_sentence() -> None:
    from fedpeft.config import ConfigError

    with pytest.raises(ConfigError, match=r"assigns the devices of 'fleet\.mix', which is empty"):
        _tiny_cfg("fleet.assign=skewed")
