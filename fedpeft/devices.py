"""Device profiles -> per-device LoRA depth and ranks, fitted to a memory budget.

LEGEND (Liu et al., 2024, "LEGEND: Leveraging Representative and Equal-interval
Layer Placement ..."): put LoRA on the top d transformer layers (counted from the
output) and let ranks grow toward the output, since deeper layers are more
task-specific. Freezing every layer below the lowest adapted one also means autograd
saves no activation there, which is most of the memory a small device saves.

Memory of one training step (fp32, AdamW):

    weights 4·P + adapters 4·P_a + gradients 4·P_a + optimizer 8·P_a
    + activations  (d · B · (T · (c_h · h + c_i · I) + c_s · n_heads · T²) + c_v · B · T · V) · 4

with P the base parameters, P_a the trainable ones, B the batch, T the sequence
length, h the hidden and I the MLP size, d the adapted depth, and V the vocabulary
of a causal LM's output logits (0 for classification). c_h, c_i and c_s
count the tensors of each size a block saves for backward; they were fitted to
:func:`fedpeft.memory.measure_step_memory` on MiniLM and a tiny BERT (T = 32, 64).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TypeGuard

from fedpeft.config import LoraConfig

# Floats saved per adapted block for backward, per B·T·h, B·T·I and B·n_heads·T²
# (fitted to saved_tensors_hooks counts of BERT blocks in training mode: inputs, q/k/v,
# context, layer norms, MLP activations, attention probabilities and dropout masks).
ACT_PER_HIDDEN = 8.5
ACT_PER_INTERMEDIATE = 0.86
ACT_PER_SCORE = 3.0
ACT_PER_LOGIT = 1.03  # causal-LM logits kept for the cross-entropy backward
BYTES = 4


@dataclass(frozen=True)
class DeviceProfile:
    """What a device offers for training.

    Args:
        name: profile name (``phone``, ``pi``, ``laptop``, ...).
        memory_mb: memory budget for one training step, in MiB.
        speed: compute speed relative to the reference device (1.0).
        uplink_mbps: uplink bandwidth in megabits per second.
        max_rank: highest LoRA rank for this device (``None``: the fleet's ``max_rank``),
            e.g. to bound the bytes a slow uplink has to carry.
    """

    name: str
    memory_mb: float
    speed: float = 1.0
    uplink_mbps: float = 10.0
    max_rank: int | None = None


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a transformer."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    base_params: int
    modules_per_layer: int  # adapted linear maps per layer (q and v: 2)
    module_in: int  # in/out features of an adapted map (h × h for q, v)
    module_out: int
    head_params: int  # trainable task head (0 without one)
    vocab_logits: int = 0  # vocabulary size of a causal LM's output (0 for classification)


@dataclass(frozen=True)
class AdapterPlan:
    """LoRA on the top ``depth`` layers; ``ranks[i]`` is the rank of layer i (0: none)."""

    depth: int
    ranks: tuple[int, ...]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.ranks) if r > 0)


def layer_ranks(num_layers: int, depth: int, top_rank: int) -> tuple[int, ...]:
    """Ranks on the top ``depth`` layers: the upper half at ``top_rank``, the lower half
    at half of it (non-decreasing toward the output); layers below get none."""
    ranks = [0] * num_layers
    lowest = num_layers - depth
    for i in range(lowest, num_layers):
        in_upper_half = (i - lowest) >= depth // 2
        ranks[i] = top_rank if in_upper_half or depth == 1 else max(1, top_rank // 2)
    return tuple(ranks)


def trainable_params(shape: ModelShape, plan: AdapterPlan) -> int:
    per_rank = shape.modules_per_layer * (shape.module_in + shape.module_out)
    return sum(r * per_rank for r in plan.ranks) + shape.head_params


def estimate_memory_bytes(shape: ModelShape, plan: AdapterPlan, batch: int, seq_len: int) -> int:
    """Weights + adapters + gradients + AdamW state + activations of one step."""
    p_a = trainable_params(shape, plan)
    states = BYTES * (shape.base_params + p_a + p_a + 2 * p_a)
    per_layer = seq_len * (
        ACT_PER_HIDDEN * shape.hidden + ACT_PER_INTERMEDIATE * shape.intermediate
    )
    per_layer += ACT_PER_SCORE * shape.num_heads * seq_len**2
    logits = ACT_PER_LOGIT * seq_len * shape.vocab_logits
    activations = BYTES * batch * (plan.depth * per_layer + logits)
    return int(states + activations)


def plan_for_budget(
    shape: ModelShape,
    budget_bytes: float,
    batch: int,
    seq_len: int,
    max_rank: int,
    rank_choices: tuple[int, ...] = (16, 8, 4, 2, 1),
) -> AdapterPlan | None:
    """The deepest plan, then the highest top rank, whose estimate fits the budget."""
    for depth in range(shape.num_layers, 0, -1):
        for top in (r for r in rank_choices if r <= max_rank):
            plan = AdapterPlan(depth, layer_ranks(shape.num_layers, depth, top))
            if estimate_memory_bytes(shape, plan, batch, seq_len) <= budget_bytes:
                return plan
    return None


def uplink_seconds(profile: DeviceProfile, payload_bytes: int) -> float:
    return 8 * payload_bytes / (profile.uplink_mbps * 1e6)


def is_positive_number(value: object) -> TypeGuard[int | float]:
    """A finite number > 0 (a bool is not a number here, though Python says it is)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def is_positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def load_profile(path: str) -> DeviceProfile:
    """Read a device profile YAML; a bad file ends in one sentence."""
    import yaml

    from fedpeft.config import ConfigError

    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as err:
        raise ConfigError(f"Device profile '{path}' cannot be read ({err.strerror}).") from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"Device profile '{path}' is not valid UTF-8 YAML.") from err
    fields = {"name", "memory_mb", "speed", "uplink_mbps", "max_rank"}
    if (
        not isinstance(raw, dict)
        or "name" not in raw
        or "memory_mb" not in raw
        or set(raw) - fields
    ):
        raise ConfigError(
            f"Device profile '{path}' should have keys name, memory_mb (and speed, uplink_mbps)."
        )
    numbers = [raw.get("memory_mb"), raw.get("speed", 1.0), raw.get("uplink_mbps", 10.0)]
    if not all(is_positive_number(v) for v in numbers):
        raise ConfigError(
            f"Device profile '{path}': memory_mb, speed and uplink_mbps should be positive numbers."
        )
    max_rank = raw.get("max_rank")
    if max_rank is not None and not is_positive_int(max_rank):
        raise ConfigError(f"Device profile '{path}': max_rank should be a positive integer.")
    memory_mb, speed, uplink_mbps = map(float, numbers)
    return DeviceProfile(str(raw["name"]), memory_mb, speed, uplink_mbps, max_rank)


def assign_profiles(
    profiles: dict[str, DeviceProfile], mix: dict[str, int], seed: int
) -> list[DeviceProfile]:
    """Client i's profile: ``mix`` expanded to one entry per client, shuffled by the seed."""
    import random

    from fedpeft.config import ConfigError

    unknown = sorted(set(mix) - set(profiles))
    if unknown:
        raise ConfigError(
            f"'fleet.mix' names unknown profile(s) {unknown}; known: {sorted(profiles)}."
        )
    fleet = [profiles[name] for name in sorted(mix) for _ in range(mix[name])]
    random.Random(seed).shuffle(fleet)
    return fleet


def skewed_assignment(fleet: list[DeviceProfile], label_counts: list[int]) -> list[DeviceProfile]:
    """A stress fleet: client i's profile when the devices, weakest (least memory) first,
    get the partitions in decreasing order of ``label_counts`` (each partition's examples
    of one label), so the weak devices hold most of that label."""
    weakest_first = sorted(fleet, key=lambda p: (p.memory_mb, p.name))
    richest_first = sorted(range(len(label_counts)), key=lambda i: (-label_counts[i], i))
    by_partition = dict(zip(richest_first, weakest_first, strict=True))
    return [by_partition[i] for i in range(len(fleet))]


LAYER_CONTAINERS = {"bert": "layer", "gpt2": "h"}


def lora_for_plan(lora: LoraConfig, plan: AdapterPlan, model_type: str) -> LoraConfig:
    """The ``lora`` section with this plan's layers and per-layer ranks (peft's
    ``layers_to_transform`` and regex-keyed ``rank_pattern``). Every adapted layer has its
    rank in the pattern, so ``r`` is left as configured: the reference rank of
    ``lora.scaling: fixed``."""
    container = LAYER_CONTAINERS.get(model_type, "layer")
    pattern = {rf"{container}\.{i}\..*": r for i, r in enumerate(plan.ranks) if r > 0}
    return dataclasses.replace(lora, layers_to_transform=plan.layers, rank_pattern=pattern)
