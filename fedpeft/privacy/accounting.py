"""Privacy accounting with Opacus's own accountants; fedpeft never does the math itself
(it only bounds the searches over z and over step counts that ask them for ε).

An accountant's whole state is its history of (noise multiplier z, sample rate q, steps),
Opacus's composition record. It travels as plain lists (a node's Flower state, the
strategy), so a node's record-level ε composes over every round it trained, not per
round (docs/architecture.md, known traps).

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
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

AccountantName = Literal["rdp", "prv"]


@dataclass(frozen=True)
class Entry:
    noise_multiplier: float
    sample_rate: float
    steps: int


def accountant(history: list[Entry], kind: AccountantName = "rdp") -> IAccountant:
    """An Opacus accountant holding ``history``."""
    # imported here: Opacus's accountants import scipy.stats (about 1 s), and every
    # ClientApp process imports this module for its node-state history
    from opacus.accountants import create_accountant

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


# Bounds of the searches below, so that no budget can make them spin. Opacus's
# get_noise_multiplier halves z toward 0 while ε(z) stays under the target: for ε = 1e15
# it never gets within 0.01 of it (adjacent floats of z are further apart in ε), and below
# z ~ 1e-155 its RDP series never ends (1 / z² overflows); PRV fails below z ~ 0.01.
MIN_NOISE = 0.05  # one step at q = 1 spends ε ≈ 280 here: nothing below it protects
MAX_NOISE = 1e6  # Opacus's MAX_SIGMA (a test checks): past it, "the budget is too low"
MAX_HALVINGS = 40  # Opacus needs up to ~22; 40 narrow the bracket to 1e-12 of its top
EPSILON_TOLERANCE = 0.01  # Opacus's default: the search stops within 0.01 below ε
# PRV composes on a mesh of about ε √steps points (ε of the probed z), so its searches
# slow down with both: at 10^4 steps 15-35 s up to ε = 20, but 2.5 min at ε = 100 (and
# 2 min at 10^3 steps); one ε alone took 16 s at 10^5 steps. Beyond these, use RDP.
PRV_MAX_STEPS = 10_000
PRV_MAX_EPSILON = 20.0
# PRV refuses a δ below its floating-point error times its mesh size ("Floating point
# errors will dominate"): at 5 steps it failed at δ = 1e-16; 1e-10 leaves the mesh of
# PRV_MAX_STEPS steps room
PRV_MIN_DELTA = 1e-10


@functools.lru_cache(maxsize=64)  # a binary search over ε; asked every round
def noise_for_budget(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: AccountantName
) -> float:
    """The noise multiplier z that spends ε at δ after ``steps`` of rate q, to 0.01 below
    ε: Opacus's get_noise_multiplier (its brackets, accountant and tolerance, so the same
    z), with the search bounded to z in [MIN_NOISE, MAX_NOISE] and MAX_HALVINGS halvings.

    A budget larger than MIN_NOISE spends gets MIN_NOISE (it spends less: still within
    the budget); one too small for MAX_NOISE raises ValueError, as Opacus does.
    """
    _check_prv(steps, kind, target_epsilon)

    def spent(z: float) -> float:
        return epsilon([Entry(z, sample_rate, steps)], delta, kind)

    low, high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        high = 2 * high
        eps_high = spent(high)
        if high > MAX_NOISE:
            raise ValueError("The privacy budget is too low.")
    for _ in range(MAX_HALVINGS):
        if target_epsilon - eps_high <= EPSILON_TOLERANCE:
            break
        z = (low + high) / 2
        if z < MIN_NOISE:  # Opacus would halve on toward 0; the floor is the last try
            if spent(MIN_NOISE) < target_epsilon:
                return MIN_NOISE
            low = MIN_NOISE
            continue
        eps = spent(z)
        if eps < target_epsilon:
            high, eps_high = z, eps
        else:
            low = z
    return high  # spends eps_high <= ε even when the halvings ran out


def _check_prv(steps: int, kind: AccountantName, target_epsilon: float = 0.0) -> None:
    """PRV's cost grows with the steps and ε (config.py refuses both up front)."""
    if kind == "prv" and (steps > PRV_MAX_STEPS or target_epsilon > PRV_MAX_EPSILON):
        raise ValueError(
            f"The PRV accountant takes minutes beyond {PRV_MAX_STEPS} steps or ε = "
            f"{PRV_MAX_EPSILON:g} ({steps} steps, ε = {target_epsilon:g} here); use RDP."
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
    with the steps, so a search over the count is exact: doubling, then halving, which
    costs about 2 log2 of the answer in ε evaluations however large ``most`` is."""
    _check_prv(most, kind)

    def fits(steps: int) -> bool:
        return epsilon([Entry(z, q, steps)], delta, kind) <= budget

    if most <= 0 or fits(most):
        return max(most, 0)
    low, high = 0, 1  # fits(low); not fits(most), so some high <= most fails
    while high < most and fits(high):
        low, high = high, 2 * high
    high = min(high, most) - 1  # the answer is in [low, high]
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
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
