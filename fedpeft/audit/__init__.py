"""Gradient-inversion audit: what an honest-but-curious server recovers from updates.

:mod:`fedpeft.audit.threat` fixes what an attack may read (:class:`ServerView`) and what
only scoring may read (:class:`Secret`); attacks are built by name from :data:`ATTACKS`.
"""

from __future__ import annotations

from collections.abc import Callable

from fedpeft.audit.base import Attack, Guess, Public
from fedpeft.audit.labels import HeadInput, LabelLeak
from fedpeft.audit.optimization import GradientMatching
from fedpeft.audit.threat import Secret, ServerView, observe
from fedpeft.audit.tokens import ProjectedSpanTest, SpanTest, TokenSet

ATTACKS: dict[str, Callable[[], Attack]] = {
    "labels": LabelLeak,
    "head_input": HeadInput,
    "token_set": TokenSet,
    "span": SpanTest,
    "span_b": ProjectedSpanTest,
    "optimization": GradientMatching,
}


def build_attack(name: str) -> Attack:
    if name not in ATTACKS:
        raise ValueError(f"Unknown attack '{name}'; known: {', '.join(ATTACKS)}.")
    return ATTACKS[name]()


__all__ = [
    "ATTACKS",
    "Attack",
    "Guess",
    "Public",
    "Secret",
    "ServerView",
    "build_attack",
    "observe",
]
