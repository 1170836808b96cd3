"""Privacy accounting with Opacus's own accountants; fedpeft never does the math itself.

An accountant's whole state is its history of (noise multiplier z, sample rate q, steps),
Opacus's composition record. It travels as plain lists (a node's Flower state, the
strategy), so a node's record-level ε composes over every round it trained, not per
round (DESIGN.md, known traps).

- Record-level DP-SGD: one entry per local step, q = batch size / client examples.
- User-level DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent
  Language Models", Alg. 1): one entry per round, q = clients sampled / clients. fedpeft
  samples a fixed number of clients per round; the RDP analysis is that of Poisson
  sampling at the same rate, as in the paper.
- Local DP: each release is a Gaussian mechanism on an update clipped to C. Two datasets
  of the client can give updates 2C apart, so the effective multiplier is σ / 2, q = 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

AccountantName = Literal["rdp", "prv"]


@dataclass(frozen=True)
class Entry:
    noise_multiplier: float
    sample_rate: float
    steps: int


def accountant(history: list[Entry], kind: AccountantName = "rdp") -> IAccountant:
    """An Opacus accountant holding ``history``."""
    acc = create_accountant(kind)
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]
    return acc


def epsilon(history: list[Entry], delta: float, kind: AccountantName = "rdp") -> float:
    """ε spent by ``history`` at δ (0 for an empty history)."""
    if not history:
        return 0.0
    return float(accountant(history, kind).get_epsilon(delta=delta))


def add_steps(history: list[Entry], z: float, q: float, steps: int) -> list[Entry]:
    """The history after ``steps`` more steps of (z, q), merged into the last entry when
    it has the same (z, q), as Opacus does."""
    if steps <= 0:
        return history
    if history and (history[-1].noise_multiplier, history[-1].sample_rate) == (z, q):
        return [*history[:-1], Entry(z, q, history[-1].steps + steps)]
    return [*history, Entry(z, q, steps)]


@functools.lru_cache(maxsize=64)  # a binary search over ε; asked every round
def noise_for_budget(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: AccountantName
) -> float:
    """The noise multiplier z that spends exactly ε at δ after ``steps`` of rate q
    (Opacus's binary search, to 0.01 in ε)."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=kind,
        )
    )


def noise_multiplier(
    configured: float | None,
    budget: float | None,
    delta: float,
    sample_rate: float,
    steps: int,
    kind: AccountantName,
) -> float:
    """z as configured, else the z that spends the budget ε over ``steps`` at rate q."""
    if configured is not None:
        return configured
    if budget is None:
        raise ValueError("a noise multiplier or a privacy budget is needed")
    return noise_for_budget(budget, delta, sample_rate, steps, kind)


def affordable_steps(
    z: float, q: float, budget: float, delta: float, most: int, kind: AccountantName
) -> int:
    """The most steps of (z, q), up to ``most``, whose ε stays within ``budget``. ε grows
    with the steps, so a binary search over the count is exact."""
    low, high = 0, most
    while low < high:
        mid = (low + high + 1) // 2
        if epsilon([Entry(z, q, mid)], delta, kind) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def to_lists(history: list[Entry]) -> dict[str, list[float] | list[int]]:
    return {
        "noise": [e.noise_multiplier for e in history],
        "rate": [e.sample_rate for e in history],
        "steps": [e.steps for e in history],
    }


def from_lists(noise: list[float], rate: list[float], steps: list[int]) -> list[Entry]:
    return [Entry(float(z), float(q), int(s)) for z, q, s in zip(noise, rate, steps, strict=True)]
