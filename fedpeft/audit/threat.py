"""The threat model, as types: what an honest-but-curious server holds, and what only
the scorer may read.

An attack receives a :class:`ServerView` (one client, one round): the decoded update
exactly as the server's aggregation would see it (after the client's clipping, local
noise and compression, and the server's own re-clip under user-level DP), the adapters
the server sent, the client's LoRA plan, the round's configuration, and public knowledge
(the base model and its tokenizer). The client's batch is a :class:`Secret`, which only
:mod:`fedpeft.audit.scoring` reads. :func:`observe` produces both by running the client's
real stages (:func:`fedpeft.stages.client_round`) on a chosen batch, then the server's
real decoder (:func:`fedpeft.wire.decode_train_res`) and reply stages on its reply.

Both honest-but-curious settings of the literature are one config away: fedSGD (one
local step on one batch, ``train.local_steps: 1``) and fedAvg (several local steps over
the client's examples, the protocol fedpeft actually runs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from peft import PeftModel

from fedpeft import stages, wire
from fedpeft.client import Kept
from fedpeft.config import Config, LoraConfig, TrainConfig, lora_to_json
from fedpeft.data import Row
from fedpeft.models import adapter_state, build_peft_model, load_adapter_state, load_tokenizer
from fedpeft.train import Encoded, encode, train_local
from fedpeft.wire import State


@dataclass(frozen=True)
class ServerView:
    """Everything the server holds about one client's update in one round."""

    update: State  # decoded Δ per exchanged tensor
    sent: State  # the adapters the client received
    lora: LoraConfig  # the client's plan
    cfg: Config  # the round's configuration (model, train recipe, defenses)
    num_labels: int

    def global_model(self) -> PeftModel:
        """The model the client started from (base + the adapters sent): the server
        can rebuild it, since it knows both."""
        model = _fresh_model(self.cfg, self.lora, self.num_labels)
        load_adapter_state(model, self.sent)
        return model


@dataclass(frozen=True)
class Secret:
    """The client's examples in that round: for scoring only, never for an attack."""

    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]
    texts: tuple[str, ...]

    @property
    def tokens(self) -> set[int]:
        return {t for ids in self.input_ids for t in ids}


def _fresh_model(cfg: Config, lora: LoraConfig, num_labels: int) -> PeftModel:
    model = build_peft_model(cfg.model, lora, num_labels)
    model.eval()
    return model


def encode_rows(cfg: Config, rows: list[Row]) -> Encoded:
    return encode(rows, load_tokenizer(cfg.model.name), cfg.model.max_length)


def observe(
    cfg: Config,
    rows: list[Row],
    sent: State,
    lora: LoraConfig,
    num_labels: int,
    server_round: int = 1,
) -> tuple[ServerView, Secret]:
    """Run one client round on ``rows`` (its whole data for the round: fedSGD takes one
    step over them, fedAvg ``train.local_steps``) and return what the server then holds,
    and the secret. ``server_round`` picks the round's seeded noise (``privacy.noise_seed``)."""
    examples = encode_rows(cfg, rows)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=len(rows)))
    ins = wire.TrainIns(
        server_round, cfg.to_json(), num_labels, sent, lora_to_json(lora), partition_id=0
    )
    res, _ = stages.client_round(ins, {}, Kept({}, []), examples=examples)
    # what crosses the wire, decoded by the server's own decoder and passed through the
    # server's own reply stages (a norm gate's rejection is the audit's error)
    received = wire.decode_train_res(wire.encode_train_res(res), sent, res.num_examples)
    for stage in stages.reply_stages(cfg):
        received = stage(received)
    update = received.update
    view = ServerView(update, sent, lora, cfg, num_labels)
    secret = Secret(
        input_ids=tuple(tuple(ids) for ids in examples.input_ids),
        labels=tuple(examples.labels),
        texts=tuple(str(r["text"]) for r in rows),
    )
    return view, secret


def initial_adapters(cfg: Config, lora: LoraConfig, num_labels: int) -> State:
    """The adapters a client receives in round 1 (B = 0 on linear layers)."""
    return adapter_state(_fresh_model(cfg, lora, num_labels))


def warmed_adapters(
    cfg: Config, lora: LoraConfig, num_labels: int, public_rows: list[Row], steps: int
) -> State:
    """Global adapters of a later round: the initial ones trained ``steps`` AdamW steps on
    public examples (B ≠ 0, as every round after the first sends)."""
    model = _fresh_model(cfg, lora, num_labels)
    recipe = TrainConfig(local_steps=steps, batch_size=cfg.train.batch_size, lr=5e-3)
    pad_id = load_tokenizer(cfg.model.name).pad_token_id
    train_local(model, encode_rows(cfg, public_rows), recipe, pad_id, cfg.model.task, seed=0)
    return adapter_state(model)
