"""``fedpeft plan``: per device profile, the adapter plan, its size and its memory.

Glue between a run config, the real model's shape and :mod:`fedpeft.devices`; with
``measure`` it also runs one real training step per plan and reports its memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.config import Config, ConfigError, LoraConfig
from fedpeft.data import load_dataset
from fedpeft.devices import (
    AdapterPlan,
    DeviceProfile,
    assign_profiles,
    estimate_memory_bytes,
    load_profile,
    lora_for_plan,
    plan_for_budget,
    trainable_params,
    uplink_seconds,
)
from fedpeft.models import _cached_base, build_peft_model, model_shape

ARRAY_FRAMING_BYTES = 560  # per exchanged array in a Flower message (name, dtype, shape, ids)


@dataclass(frozen=True)
class PlanRow:
    profile: DeviceProfile
    plan: AdapterPlan | None
    trainable: int
    estimate_bytes: int
    round_bytes: int
    measured_bytes: int | None


def fleet_profiles(cfg: Config) -> dict[str, DeviceProfile]:
    profiles = [load_profile(p) for p in cfg.fleet.profiles]
    if not profiles:
        raise ConfigError("The config has no 'fleet.profiles'; list device profile files there.")
    return {p.name: p for p in profiles}


def rank_cap(cfg: Config, profile: DeviceProfile) -> int:
    return min(cfg.fleet.max_rank, profile.max_rank or cfg.fleet.max_rank)


def plan_fleet(cfg: Config, measure: bool = False) -> list[PlanRow]:
    num_labels = load_dataset(cfg.data, cfg.model.task, cfg.seed).num_labels
    shape = model_shape(cfg.model, cfg.lora, num_labels)
    model_type = _cached_base(cfg.model, num_labels).config.model_type
    batch, seq = cfg.train.batch_size, cfg.model.max_length
    rows = []
    for profile in fleet_profiles(cfg).values():
        plan = plan_for_budget(shape, profile.memory_mb * 2**20, batch, seq, rank_cap(cfg, profile))
        if plan is None:
            rows.append(PlanRow(profile, None, 0, 0, 0, None))
            continue
        n = trainable_params(shape, plan)
        arrays = 2 * shape.modules_per_layer * plan.depth + (2 if shape.head_params else 0)
        measured = (
            _measure(cfg, lora_for_plan(cfg.lora, plan, model_type), num_labels)
            if measure
            else None
        )
        estimate = estimate_memory_bytes(shape, plan, batch, seq)
        rows.append(
            PlanRow(profile, plan, n, estimate, 4 * n + ARRAY_FRAMING_BYTES * arrays, measured)
        )
    return rows


def _measure(cfg: Config, lora: object, num_labels: int) -> int:
    from fedpeft.memory import measure_step_memory
    from fedpeft.train import Encoded, collate

    model = build_peft_model(cfg.model, lora, num_labels)  # type: ignore[arg-type]
    b, t = cfg.train.batch_size, cfg.model.max_length
    data = Encoded([[101, *range(2000, 2000 + t - 2), 102]] * b, [0] * b)
    return sum(
        measure_step_memory(model, collate(data, list(range(b)), 0, cfg.model.task)).values()
    )


def format_plan(rows: list[PlanRow]) -> str:
    head = f"{'profile':<10}{'depth':>6}  {'ranks (layer 0 ->)':<24}{'trainable':>10}{'est. MiB':>10}{'meas. MiB':>10}{'KB/round':>10}{'upload s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.plan is None:
            lines.append(
                f"{r.profile.name:<10}  does not fit: {r.profile.memory_mb:.0f} MiB is below the base weights"
            )
            continue
        measured = f"{r.measured_bytes / 2**20:10.1f}" if r.measured_bytes else f"{'-':>10}"
        ranks = ",".join(map(str, r.plan.ranks))
        lines.append(
            f"{r.profile.name:<10}{r.plan.depth:>6}  {ranks:<24}{r.trainable:>10,}{r.estimate_bytes / 2**20:>10.1f}"
            f"{measured}{r.round_bytes / 1e3:>10.1f}{uplink_seconds(r.profile, r.round_bytes):>9.2f}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class FleetPlan:
    """Each client's LoRA section and the global one that covers them all."""

    client_loras: dict[int, LoraConfig]
    global_lora: LoraConfig
    profile_names: dict[int, str]


def plan_clients(cfg: Config, num_labels: int) -> FleetPlan:
    """Plans per partition: from the fleet's profiles, or ``cfg.lora`` for everyone."""
    n = cfg.partition.num_clients
    if not cfg.fleet.profiles:
        return FleetPlan(
            {i: cfg.lora for i in range(n)}, cfg.lora, dict.fromkeys(range(n), "uniform")
        )
    shape = model_shape(cfg.model, cfg.lora, num_labels)
    model_type = _cached_base(cfg.model, num_labels).config.model_type
    batch, seq = cfg.train.batch_size, cfg.model.max_length
    profiles = fleet_profiles(cfg)
    by_name = {}
    for name, profile in profiles.items():
        plan = plan_for_budget(shape, profile.memory_mb * 2**20, batch, seq, rank_cap(cfg, profile))
        if plan is None:
            raise ConfigError(
                f"Device profile '{name}' ({profile.memory_mb:.0f} MiB) cannot train even one "
                f"adapted layer of '{cfg.model.name}' at batch {batch} and length {seq}."
            )
        by_name[name] = plan
    fleet = assign_profiles(profiles, cfg.fleet.mix, cfg.seed)
    plans = {i: by_name[p.name] for i, p in enumerate(fleet)}
    union = AdapterPlan(
        depth=max(p.depth for p in plans.values()),
        ranks=tuple(
            max(p.ranks[layer] for p in plans.values()) for layer in range(shape.num_layers)
        ),
    )
    return FleetPlan(
        client_loras={i: lora_for_plan(cfg.lora, p, model_type) for i, p in plans.items()},
        global_lora=lora_for_plan(cfg.lora, union, model_type),
        profile_names={i: p.name for i, p in enumerate(fleet)},
    )
