"""Types and helpers shared by aggregators.

State keys follow peft: ``<module>.lora_A.weight`` (r × n) and ``<module>.lora_B.weight``
(m × r) for each adapted module, plus task-head tensors that every client shares in the
same shape. A client of rank r_k gets the first r_k components of a module's global
factors (its *cut*) and applies them with scaling s(r_k) (``lora.scaling``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from fedpeft.types import State as State  # re-exported

Scaling = Callable[[int], float]  # s(r): the LoRA factor on B A at rank r (LoraConfig.scaling_for)
LORA_A, LORA_B = ".lora_A.", ".lora_B."


@dataclass(frozen=True)
class ClientUpdate:
    """One client's decoded update for a round.

    Args:
        client_id: the client (partition) id; stable across runs.
        delta: adapters_after − adapters_received, per exchanged tensor.
        weight: aggregation weight (the number of examples trained on).
        sent: the adapters this client received (its cut of the global state).
    """

    client_id: int
    delta: State
    weight: float
    sent: State = field(default_factory=dict)

    def adapters(self) -> State:
        """The client's adapters after training: sent + Δ."""
        return {k: self.sent[k] + d for k, d in self.delta.items()}


class Aggregator(Protocol):
    """How the global adapters are cut for a client and rebuilt from the replies."""

    def cut(
        self, global_state: State, shapes: dict[str, tuple[int, ...]], scaling: Scaling
    ) -> State:
        """The client's adapters, for the tensor shapes of its plan."""
        ...

    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], scaling: Scaling
    ) -> State:
        """The new global state; modules no client trained keep their value."""
        ...


@runtime_checkable
class MergesIntoBase(Protocol):
    """An aggregator whose round update is merged into every client's base weights
    (FLoRA) instead of living in the exchanged adapters."""

    def stack(self, global_state: State, updates: list[ClientUpdate], scaling: Scaling) -> State:
        """The round's exact product update as low-rank factors under LoRA keys, with the
        weights and scalings folded into B (ΔW = B A per module)."""
        ...


def module_of(key: str) -> str | None:
    """The adapted module a LoRA key belongs to (None for head tensors)."""
    for marker in (LORA_A, LORA_B):
        if marker in key:
            return key.split(marker)[0]
    return None


def lora_keys(module: str) -> tuple[str, str]:
    return f"{module}{LORA_A}weight", f"{module}{LORA_B}weight"


def product(state: State, module: str, scaling: Scaling) -> np.ndarray:
    """s(r) B A of one module (m × n, float64)."""
    key_a, key_b = lora_keys(module)
    return scaling(state[key_a].shape[0]) * (state[key_b].astype(np.float64) @ state[key_a])


def truncate(global_state: State, shapes: dict[str, tuple[int, ...]]) -> State:
    """The leading block of each global tensor with the requested shape (first r_k rank
    components: rows of A, columns of B)."""
    out = {}
    for key, shape in shapes.items():
        value = global_state[key]
        if any(s > g for s, g in zip(shape, value.shape, strict=True)):
            raise ValueError(f"'{key}' of shape {shape} exceeds the global {value.shape}")
        out[key] = np.ascontiguousarray(value[tuple(slice(0, s) for s in shape)])
    return out


class LeadingCut:
    """A client gets the leading r_k components of the global factors as they are (the
    cut of FedIT, HetLoRA and FLoRA; FlexLoRA also rescales B)."""

    def cut(
        self, global_state: State, shapes: dict[str, tuple[int, ...]], scaling: Scaling
    ) -> State:
        return truncate(global_state, shapes)


def owner_shares(updates: list[ClientUpdate], key: str) -> list[tuple[ClientUpdate, float]]:
    """The clients that sent ``key``, each with p_k = w_k / Σ_j w_j over them (a layer is
    averaged over the clients that own it)."""
    owners = [u for u in updates if key in u.delta]
    total = sum(u.weight for u in owners)
    return [(u, u.weight / total) for u in owners]


def pad_to(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    padded = np.zeros(shape, dtype=np.float64)
    padded[tuple(slice(0, s) for s in value.shape)] = value
    return padded


def weighted_mean(values: list[tuple[float, np.ndarray]], shape: tuple[int, ...]) -> np.ndarray:
    """Σ_k p_k pad(v_k) with p_k = w_k / Σ_j w_j."""
    total = sum(w for w, _ in values)
    return sum((w / total) * pad_to(v, shape) for w, v in values)  # type: ignore[return-value]


def average_deltas(global_state: State, updates: list[ClientUpdate], keys: list[str]) -> State:
    """x + Σ_k p_k pad(Δ_k) per key, over the clients that sent it (FedAvg on tensors)."""
    out = {}
    for key in keys:
        owners = [(u.weight, u.delta[key]) for u in updates if key in u.delta]
        value = global_state[key]
        out[key] = (
            value
            if not owners
            else (value + weighted_mean(owners, value.shape)).astype(value.dtype)
        )
    return out


def server_step(old: State, aggregate: State, server_lr: float) -> State:
    """x + η_s (aggregate − x): the server optimizer step of FedOpt with plain SGD."""
    if server_lr == 1.0:
        return aggregate
    return {k: (old[k] + server_lr * (aggregate[k] - old[k])).astype(old[k].dtype) for k in old}
