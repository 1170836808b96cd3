"""What every attack shares: public knowledge, the guess it returns, and how it finds the
parts of an update it reads (task head, embedding LoRA, first-layer LoRA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedpeft.audit.threat import ServerView
from fedpeft.wire import State


@dataclass(frozen=True)
class Public:
    """Public knowledge beyond the base model and tokenizer: candidate sentences an
    attacker can score (a retrieval pool; it may or may not contain the private ones)."""

    candidates: tuple[str, ...] = ()


@dataclass(frozen=True)
class Guess:
    """An attack's answer. Unset fields are what the attack does not claim to recover."""

    labels: tuple[int, ...] | None = None  # the batch's labels (a multiset)
    tokens: frozenset[int] | None = None  # token ids in the batch
    head_inputs: np.ndarray | None = None  # (k, d) recovered inputs of the task head
    texts: tuple[str, ...] | None = None  # sentences (retrieved or reconstructed)
    notes: tuple[str, ...] = field(default_factory=tuple)


class Attack(Protocol):
    """One attack on one client's update in one round."""

    name: str

    def unavailable(self, view: ServerView) -> str | None:
        """Why the attack cannot run on this view (a part it reads is absent), or None."""
        ...

    def run(self, view: ServerView, public: Public) -> Guess:
        """The guess, from the view and public knowledge only."""
        ...


@dataclass(frozen=True)
class HeadKeys:
    weight: str
    bias: str | None


def head_keys(state: State, num_labels: int) -> HeadKeys | None:
    """The exchanged task head: the non-LoRA (num_labels × d) weight and its bias."""
    weights = [
        k
        for k, v in state.items()
        if ".lora_" not in k and v.ndim == 2 and v.shape[0] == num_labels
    ]
    if not weights:
        return None
    weight = weights[0]
    bias = weight[: -len("weight")] + "bias"
    return HeadKeys(weight, bias if bias in state else None)


def module_name(key: str) -> str:
    """'base_model.model.classifier.weight' -> 'base_model.model.classifier'."""
    return key.rsplit(".", 1)[0]
