"""Scoring a guess against the secret: the only code that reads the client's batch.

Token precision/recall over the batch's token set (special tokens excluded: every
sentence has them); label accuracy as the multiset overlap over the batch size; head
input cosine (best match over the batch); exact sentence matches and ROUGE-1/2/L
F-measures (Lin, 2004) after optimal one-to-one matching of guessed and true sentences
(Hungarian assignment on ROUGE-L, as LAMP and DAGER report them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from rouge_score import rouge_scorer
from scipy.optimize import linear_sum_assignment

from fedpeft.audit.base import Guess
from fedpeft.audit.labels import cosine_matrix, head_inputs
from fedpeft.audit.threat import Secret, ServerView
from fedpeft.models import load_tokenizer

ROUGE = ("rouge1", "rouge2", "rougeL")


def score(guess: Guess, secret: Secret, view: ServerView) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if guess.labels is not None:
        out["label_accuracy"] = label_accuracy(guess.labels, secret.labels)
    if guess.tokens is not None:
        special = set(load_tokenizer(view.cfg.model.name).all_special_ids)
        precision, recall = token_precision_recall(guess.tokens - special, secret.tokens - special)
        out["token_precision"], out["token_recall"] = precision, recall
    if guess.head_inputs is not None:
        truth = head_inputs(view, list(secret.texts))
        out["head_input_cosine"] = float(cosine_matrix(guess.head_inputs, truth).max())
    if guess.texts is not None:
        seen = _as_model_saw(view)
        out.update(sentence_scores(tuple(map(seen, guess.texts)), tuple(map(seen, secret.texts))))
    return out


def _as_model_saw(view: ServerView) -> Callable[[str], str]:
    """A sentence as the model saw it (tokenized, truncated, decoded): a guess is then not
    penalized for the tokenizer's casing and spacing, nor for words past max_length."""
    tok = load_tokenizer(view.cfg.model.name)
    limit = view.cfg.model.max_length

    def seen(text: str) -> str:
        ids = tok(text, truncation=True, max_length=limit)["input_ids"]
        return str(tok.decode(ids, skip_special_tokens=True))

    return seen


def label_accuracy(guessed: tuple[int, ...], true: tuple[int, ...]) -> float:
    overlap = Counter(guessed) & Counter(true)
    return sum(overlap.values()) / len(true)


def token_precision_recall(
    guessed: set[int] | frozenset[int], true: set[int]
) -> tuple[float, float]:
    hits = len(set(guessed) & true)
    precision = hits / len(guessed) if guessed else 0.0
    recall = hits / len(true) if true else 1.0
    return precision, recall


def sentence_scores(guessed: tuple[str, ...], true: tuple[str, ...]) -> dict[str, float]:
    """Exact matches and mean ROUGE F over the true sentences, matched one to one."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE))
    table = np.zeros((len(guessed), len(true), len(ROUGE)))
    for i, g in enumerate(guessed):
        for j, t in enumerate(true):
            scores = scorer.score(t, g)
            table[i, j] = [scores[name].fmeasure for name in ROUGE]
    rows, cols = linear_sum_assignment(-table[:, :, 2])  # maximize ROUGE-L
    out = {name: float(table[rows, cols, k].sum() / len(true)) for k, name in enumerate(ROUGE)}
    exact = sum(_normal(guessed[i]) == _normal(true[j]) for i, j in zip(rows, cols, strict=True))
    out["exact_matches"] = exact / len(true)
    return out


def _normal(text: str) -> str:
    return " ".join(text.lower().split())
