"""``fedpeft plan``: per device profile, the adapter plan, its size and its memory.

Glue between a run config, the real model's shape and :mod:`fedpeft.devices`; with
``measure`` it also runs one real training step per plan and reports its memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpeft.config import Config, ConfigError, LoraConfig
from fedpeft.data import load_dataset, partition_label_counts
from fedpeft.devices import (
    AdapterPlan,
    DeviceProfile,
    ModelShape,
    assign_profiles,
    estimate_memory_bytes,
    load_profile,
    lora_for_plan,
    plan_for_budget,
    skewed_assignment,
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


def format_clients(cfg: Config) -> str:
    """Which profile each client has under ``fleet.assign`` and what ``fleet.policy``
    makes of it (the plan its profile affords, the fleet's common plan, or left out)."""
    num_labels = load_dataset(cfg.data, cfg.model.task, cfg.seed).num_labels
    fleet = plan_clients(cfg, num_labels)
    trains = {
        "adapt": "its profile's plan",
        "bucket": "the common plan",
        "exclude": "the lora section",
    }
    counts = partition_label_counts(cfg, label=0) if cfg.fleet.assign == "skewed" else None
    lines = [f"fleet.assign: {cfg.fleet.assign}, fleet.policy: {cfg.fleet.policy}"]
    for pid in range(cfg.partition.num_clients):
        held = f" ({counts[pid]} examples of label 0)" if counts is not None else ""
        if pid in fleet.left_out:
            lines.append(f"client {pid}{held}: left out: {fleet.left_out[pid]}")
        else:
            lines.append(
                f"client {pid}{held}: {fleet.profile_names[pid]}, trains {trains[cfg.fleet.policy]}"
            )
    return "\n".join(lines)


@dataclass(frozen=True)
class FleetPlan:
    """Each client's LoRA section and the global one that covers them all.

    ``left_out`` maps a partition whose node declared a profile too small to train even
    one layer to the reason: one weak device should not stop the whole federation, so
    it takes no part (and has no entry in ``client_loras``).
    """

    client_loras: dict[int, LoraConfig]
    global_lora: LoraConfig
    profile_names: dict[int, str]
    left_out: dict[int, str] = field(default_factory=dict)


def plan_clients(
    cfg: Config, num_labels: int, declared: dict[int, DeviceProfile] | None = None
) -> FleetPlan:
    """Plans per partition. ``declared`` maps a partition id to the profile its node
    declared (deployment); it overrides the fleet config's assignment for that partition.
    Other partitions take their profile from ``fleet.profiles``/``fleet.mix``, or
    ``cfg.lora`` as it is when the config has no fleet."""
    n = cfg.partition.num_clients
    declared = {p: prof for p, prof in (declared or {}).items() if 0 <= p < n}
    if not cfg.fleet.profiles and not declared:
        return FleetPlan(
            {i: cfg.lora for i in range(n)}, cfg.lora, dict.fromkeys(range(n), "uniform")
        )
    shape = model_shape(cfg.model, cfg.lora, num_labels)
    model_type = _cached_base(cfg.model, num_labels).config.model_type
    configured = _configured_plans(cfg, shape)  # partition -> (name, plan); {} without a fleet
    left_out: dict[int, str] = {}
    for pid, profile in sorted(declared.items()):
        configured.pop(pid, None)
        plan = _profile_plan(cfg, shape, profile)
        if plan is None:
            left_out[pid] = _too_small(cfg, profile)
        else:
            configured[pid] = (profile.name, plan)
    configured = _apply_policy(cfg, shape.num_layers, configured, left_out)
    uniform = [i for i in range(n) if i not in configured and i not in left_out]
    plans = [plan for _, plan in configured.values()]
    if uniform:
        plans.append(_plan_of_lora(cfg.lora, shape.num_layers))
    if not plans:
        raise ConfigError(f"No client can train: {'; '.join(left_out.values())}")
    loras = {p: lora_for_plan(cfg.lora, plan, model_type) for p, (_, plan) in configured.items()}
    names = {p: name for p, (name, _) in configured.items()}
    return FleetPlan(
        client_loras=dict(sorted({**loras, **dict.fromkeys(uniform, cfg.lora)}.items())),
        global_lora=lora_for_plan(cfg.lora, union_plan(plans), model_type),
        profile_names=dict(sorted({**names, **dict.fromkeys(uniform, "uniform")}.items())),
        left_out=left_out,
    )


def _apply_policy(
    cfg: Config,
    num_layers: int,
    configured: dict[int, tuple[str, AdapterPlan]],
    left_out: dict[int, str],
) -> dict[int, tuple[str, AdapterPlan]]:
    """``fleet.policy`` on the planned clients: ``adapt`` keeps each plan; ``bucket``
    gives every client the plan all of them afford; ``exclude`` gives the clients whose
    plan holds the ``lora`` section's that section, and leaves the others out (their
    reason goes into ``left_out``)."""
    policy = cfg.fleet.policy
    if policy == "adapt" or not configured:
        return configured
    if policy == "bucket":
        # memory grows with depth and rank, so the smallest rank of each layer over the
        # fleet is a plan every device affords
        common = intersection_plan([plan for _, plan in configured.values()])
        return {pid: (name, common) for pid, (name, _) in configured.items()}
    reference = _plan_of_lora(cfg.lora, num_layers)
    kept = {}
    for pid, (name, plan) in configured.items():
        if holds(plan, reference):
            kept[pid] = (name, reference)
        else:
            left_out[pid] = (
                f"device profile '{name}' affords ranks {plan.ranks}, less than the 'lora' "
                f"section's {reference.ranks}, and 'fleet.policy' is 'exclude'"
            )
    return kept


def holds(plan: AdapterPlan, other: AdapterPlan) -> bool:
    """Every layer of ``plan`` has at least the rank ``other`` gives it."""
    return all(r >= o for r, o in zip(plan.ranks, other.ranks, strict=True))


def intersection_plan(plans: list[AdapterPlan]) -> AdapterPlan:
    """The largest plan that every plan contains: each layer at its smallest rank."""
    ranks = tuple(min(ranks) for ranks in zip(*(p.ranks for p in plans), strict=True))
    adapted = [i for i, r in enumerate(ranks) if r > 0]
    if not adapted:
        raise ConfigError("'fleet.policy: bucket' needs a layer that every device can train.")
    return AdapterPlan(depth=len(ranks) - adapted[0], ranks=ranks)  # down to its lowest


def _profile_plan(cfg: Config, shape: ModelShape, profile: DeviceProfile) -> AdapterPlan | None:
    """The planner's answer for one profile at this run's batch and sequence length."""
    batch, seq = cfg.train.batch_size, cfg.model.max_length
    return plan_for_budget(shape, profile.memory_mb * 2**20, batch, seq, rank_cap(cfg, profile))


def _too_small(cfg: Config, profile: DeviceProfile) -> str:
    return (
        f"Device profile '{profile.name}' ({profile.memory_mb:.0f} MiB) cannot train even one "
        f"adapted layer of '{cfg.model.name}' at batch {cfg.train.batch_size} and length "
        f"{cfg.model.max_length}."
    )


def _configured_plans(cfg: Config, shape: ModelShape) -> dict[int, tuple[str, AdapterPlan]]:
    """Partition -> (profile name, plan) from the fleet config. A configured profile that
    cannot train is the operator's own mistake, so it stops the run in one sentence."""
    if not cfg.fleet.profiles:
        return {}
    profiles = fleet_profiles(cfg)
    by_name = {}
    for name, profile in profiles.items():
        plan = _profile_plan(cfg, shape, profile)
        if plan is None:
            raise ConfigError(_too_small(cfg, profile))
        by_name[name] = plan
    fleet = assign_profiles(profiles, cfg.fleet.mix, cfg.seed)
    if cfg.fleet.assign == "skewed":
        fleet = skewed_assignment(fleet, partition_label_counts(cfg, label=0))
    return {i: (p.name, by_name[p.name]) for i, p in enumerate(fleet)}


def _plan_of_lora(lora: LoraConfig, num_layers: int) -> AdapterPlan:
    """``cfg.lora`` as a plan, so that the global adapter also covers the clients that use
    it unchanged next to planned ones. A regex ``rank_pattern`` has no such form."""
    if lora.rank_pattern:
        raise ConfigError(
            "Declared device profiles next to clients without one need 'fleet.profiles' or a "
            "'lora' section without 'rank_pattern'."
        )
    layers = range(num_layers) if lora.layers_to_transform is None else lora.layers_to_transform
    ranks = tuple(lora.r if i in layers else 0 for i in range(num_layers))
    return AdapterPlan(depth=num_layers - min(layers, default=num_layers), ranks=ranks)


def union_plan(plans: list[AdapterPlan]) -> AdapterPlan:
    """The smallest plan that contains every plan: the global adapter must hold every
    client's layers at its highest rank, or some client's update would have no place."""
    return AdapterPlan(
        depth=max(p.depth for p in plans),
        ranks=tuple(max(ranks) for ranks in zip(*(p.ranks for p in plans), strict=True)),
    )
