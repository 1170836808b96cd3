"""The audit as a server-side tap during ``fedpeft simulate`` (``audit.tap_every: N``).

Every N rounds the attacks of ``audit.attacks`` run on each accepted update exactly as
the aggregator receives it (step 6 of the round in docs/architecture.md: after decoding
and the server's re-clip), with the public sentences of the held-out split as the
retrieval pool. Scoring needs
the client's examples, which only a simulation can reproduce: the partition and the
round's batch order follow from the run's seed (:func:`fedpeft.client.round_seed`).
Under record-level DP the Poisson batches come from OS entropy, so nothing is scored.
The means over the round's clients go into that round's ``metrics.jsonl`` line.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedpeft.aggregation.base import ClientUpdate
from fedpeft.audit import Public, build_attack
from fedpeft.audit.scoring import score
from fedpeft.audit.threat import Secret, ServerView
from fedpeft.client import client_data, round_seed
from fedpeft.config import Config, LoraConfig
from fedpeft.data import Row
from fedpeft.models import load_tokenizer
from fedpeft.train import batch_indices


class AuditTap:
    def __init__(self, cfg: Config, num_labels: int, public_rows: list[Row]) -> None:
        self.cfg = cfg
        self.num_labels = num_labels
        self.attacks = [build_attack(name) for name in cfg.audit.attacks]
        self.public = Public(tuple(str(r["text"]) for r in public_rows[: cfg.audit.candidates]))

    def due(self, server_round: int) -> bool:
        every = self.cfg.audit.tap_every
        return every > 0 and server_round % every == 0

    def __call__(
        self, server_round: int, updates: list[tuple[ClientUpdate, LoraConfig]]
    ) -> dict[str, dict[str, float]]:
        """Mean score per attack and metric over the round's clients."""
        scores: dict[str, dict[str, list[float]]] = {}
        for update, lora in updates:
            secret = round_examples(self.cfg, update.client_id, server_round)
            if secret is None:
                continue
            train = dataclasses.replace(self.cfg.train, batch_size=len(secret.labels))
            view = ServerView(
                update.delta,
                update.sent,
                lora,
                dataclasses.replace(self.cfg, train=train),
                self.num_labels,
            )
            for attack in self.attacks:
                if attack.unavailable(view) is None:
                    guess = attack.run(view, self.public)
                    for metric, value in score(guess, secret, view).items():
                        scores.setdefault(attack.name, {}).setdefault(metric, []).append(value)
        return {a: {m: float(np.mean(v)) for m, v in ms.items()} for a, ms in scores.items()}


def round_examples(cfg: Config, partition_id: int, server_round: int) -> Secret | None:
    """The distinct examples a simulated client trained on in a round (the scorer's
    secret), rebuilt from the seed as :func:`fedpeft.train.train_local` drew them."""
    if cfg.privacy.mode == "record":
        return None
    data = client_data(cfg, partition_id).train
    rng = np.random.default_rng(round_seed(cfg.seed, server_round, partition_id))
    seen = sorted(
        {
            int(i)
            for b in batch_indices(len(data), cfg.train.batch_size, cfg.train.local_steps, rng)
            for i in b
        }
    )
    tok = load_tokenizer(cfg.model.name)
    ids = tuple(tuple(data.input_ids[i]) for i in seen)
    return Secret(
        input_ids=ids,
        labels=tuple(data.labels[i] for i in seen),
        texts=tuple(str(tok.decode(list(x), skip_special_tokens=True)) for x in ids),
    )
