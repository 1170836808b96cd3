"""One client's work for a round, independent of Flower: install the received adapters
on the (cached) model, train locally, and return Δ = adapters_after − adapters_received.

The ClientApp in ``clients/`` is a thin wrapper around :func:`train_round`; the overhead
benchmark calls the same function in a plain loop.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from peft import PeftModel

from fedpeft.aggregation import merge_stacks
from fedpeft.compression.codec import dense, unpack
from fedpeft.compression.compeft import apply_change, compress
from fedpeft.compression.rice import CodecError
from fedpeft.config import (
    Config,
    DataConfig,
    LoraConfig,
    ModelConfig,
    PartitionConfig,
    config_from_json,
    lora_from_json,
)
from fedpeft.data import client_rows
from fedpeft.models import (
    adapter_state,
    build_peft_model,
    load_adapter_state,
    load_tokenizer,
    set_base_deltas,
)
from fedpeft.train import Encoded, encode, evaluate, train_local
from fedpeft.wire import State, TrainIns, TrainRes


@dataclass(frozen=True)
class ClientData:
    train: Encoded
    test: Encoded


@functools.lru_cache(maxsize=8)
def parse_config(config_json: str) -> Config:
    return config_from_json(config_json)


@functools.lru_cache(maxsize=8)
def parse_lora(lora_json: str) -> LoraConfig:
    return lora_from_json(lora_json)


@functools.lru_cache(maxsize=4)
def _cached_model(model: ModelConfig, lora: LoraConfig, num_labels: int) -> PeftModel:
    # Every trainable tensor is overwritten by the received adapters each round, so one
    # model per (process, plan) serves every round and every partition with that plan.
    return build_peft_model(model, lora, num_labels)


def _installed_model(ins: TrainIns, cfg: Config, base_delta: State) -> PeftModel:
    model = _cached_model(cfg.model, parse_lora(ins.lora_json), ins.num_labels)
    set_base_deltas(model, base_delta)
    load_adapter_state(model, ins.adapters)
    return model


def merge_received(merged_round: int, base_delta: State, ins: TrainIns) -> tuple[int, State]:
    """Merge the stacked updates of the rounds after ``merged_round`` into this node's
    dense Σ ΔW (FLoRA); a round received twice is merged once."""
    fresh = sorted(t for t in ins.merges if t > merged_round)
    if not fresh:
        return merged_round, base_delta
    return fresh[-1], merge_stacks(base_delta, [ins.merges[t] for t in fresh])


@functools.lru_cache(maxsize=64)
def _client_data(
    data: DataConfig, part: PartitionConfig, model: ModelConfig, seed: int, partition_id: int
) -> ClientData:
    train_rows, test_rows = client_rows(data, part, model.task, seed, partition_id)
    tok = load_tokenizer(model.name)
    return ClientData(
        train=encode(train_rows, tok, model.max_length),
        test=encode(test_rows, tok, model.max_length),
    )


def client_data(cfg: Config, partition_id: int) -> ClientData:
    return _client_data(cfg.data, cfg.partition, cfg.model, cfg.seed, partition_id)


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Per (run, round, client) seed for batch order and dropout."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


def train_round(ins: TrainIns, base_delta: State | None = None) -> TrainRes:
    """Train the received adapters on the partition the server named; return Δ.

    ``base_delta``: the node's merged updates (module -> ΔW), added to the base weights.
    """
    partition_id = ins.partition_id
    cfg = parse_config(ins.config_json)
    model = _installed_model(ins, cfg, base_delta or {})
    data = client_data(cfg, partition_id)
    pad_id = load_tokenizer(cfg.model.name).pad_token_id
    result = train_local(
        model,
        data.train,
        cfg.train,
        pad_id,
        cfg.model.task,
        seed=round_seed(cfg.seed, ins.server_round, partition_id),
    )
    after = adapter_state(model)
    delta = {k: after[k] - ins.adapters[k] for k in ins.adapters}
    return TrainRes(
        update=delta,
        num_examples=result.num_examples,
        train_loss=result.loss,
        train_seconds=result.seconds,
    )


class StaleView(ValueError):
    """A downlink change against adapters this node does not hold."""


def received_adapters(ins: TrainIns, view_number: int, view: State) -> TrainIns:
    """The message with its adapters in full: as sent, or (downlink compression) this
    node's view plus the compressed change. A change against another view than the one
    held (the node lost its state) raises :class:`StaleView`; the server then resends
    the fp32 adapters."""
    if ins.downlink is None:
        return ins
    if view_number != ins.base_view or not view:
        raise StaleView(
            f"the downlink change is against view {ins.base_view}, this node holds {view_number}"
        )
    try:
        change = unpack(ins.downlink, {k: v.shape for k, v in view.items()})
    except CodecError as err:
        raise StaleView(f"the downlink change does not decode: {err}") from None
    return dataclasses.replace(ins, adapters=apply_change(view, change), downlink=None)


def compress_update(res: TrainRes, cfg: Config, residual: State) -> tuple[TrainRes, State]:
    """ComPEFT-compress Δ (plus the error-feedback residual); returns the reply and the
    residual to keep ({} without error feedback). ``update`` becomes what is sent."""
    comp = cfg.compression
    if comp.density is None:
        return res, {}
    fits = residual.keys() == res.update.keys() and all(
        residual[k].shape == v.shape for k, v in res.update.items()
    )
    sent, new_residual = compress(
        res.update, residual if fits else {}, comp.density, comp.scale, comp.alpha
    )
    res = dataclasses.replace(res, update=dense(sent), compressed=sent)
    return res, new_residual if comp.error_feedback else {}


def evaluate_round(ins: TrainIns, base_delta: State | None = None) -> tuple[int, dict[str, float]]:
    """Evaluate the received global adapters on this client's held-out split."""
    cfg = parse_config(ins.config_json)
    model = _installed_model(ins, cfg, base_delta or {})
    data = client_data(cfg, ins.partition_id)
    if len(data.test) == 0:
        return 0, {}
    pad_id = load_tokenizer(cfg.model.name).pad_token_id
    metrics = evaluate(model, data.test, cfg.federation.eval_batch_size, pad_id, cfg.model.task)
    return len(data.test), metrics
