"""One client's work for a round, independent of Flower: install the received adapters
on the (cached) model, train locally, and return Δ = adapters_after − adapters_received;
and the transforms the client stages of :mod:`fedpeft.stages` apply to it (clip, local
noise, compression, re-clip, redacted metrics), which choose among these.

The ClientApp in ``clients/`` runs :func:`fedpeft.stages.client_round`; the overhead
benchmark calls :func:`train_round` in a plain loop.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
from peft import PeftModel

from fedpeft import lora_sb, sparse_ft
from fedpeft.aggregation import merge_stacks
from fedpeft.cache import cached_splits, file_stamp
from fedpeft.compression.codec import dense, unpack
from fedpeft.compression.compeft import apply_change, compress, rescaled
from fedpeft.compression.rice import CodecError
from fedpeft.config import (
    Config,
    DataConfig,
    LoraConfig,
    ModelConfig,
    PartitionConfig,
    SparseConfig,
    config_from_json,
    lora_from_json,
)
from fedpeft.data import client_rows
from fedpeft.errors import ModelError
from fedpeft.models import (
    adapter_state,
    build_peft_model,
    is_head,
    load_adapter_state,
    load_tokenizer,
    set_base_deltas,
)
from fedpeft.privacy.accounting import Entry, add_steps, epsilon, noise_multiplier
from fedpeft.privacy.dpsgd import sample_rate, train_local_dp
from fedpeft.privacy.mechanisms import global_norm
from fedpeft.train import (
    Encoded,
    TrainResult,
    encode,
    score,
    summed_weight_gradients,
    train_local,
)
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
def _cached_model(
    model: ModelConfig,
    lora: LoraConfig,
    num_labels: int,
    checkpointing: bool,
    sparse: SparseConfig | None = None,
) -> PeftModel:
    # Every trainable tensor is overwritten by the received adapters each round, so one
    # model per (process, plan) serves every round and every partition with that plan.
    return build_peft_model(
        model, lora, num_labels, gradient_checkpointing=checkpointing, sparse=sparse
    )


def _model_for(ins: TrainIns, cfg: Config) -> PeftModel:
    """This process's model for the message's plan (SHiRA's for ``peft.method: sparse``)."""
    sparse = cfg.sparse if cfg.peft.method == "sparse" else None
    return _cached_model(
        cfg.model, parse_lora(ins.lora_json), ins.num_labels, cfg.train.gradient_checkpointing,
        sparse,
    )  # fmt: skip


def _installed_model(ins: TrainIns, cfg: Config, base_delta: State) -> PeftModel:
    model = _model_for(ins, cfg)
    set_base_deltas(model, base_delta)
    if cfg.peft.method == "sparse":
        _install_mask(model, ins)
    load_adapter_state(model, _carried(ins, cfg))
    return model


def _install_mask(model: PeftModel, ins: TrainIns) -> None:
    """The run's sparse positions on this (cached) model, decoded once per structure."""
    if ins.structure is None:
        raise MissingStructure("this node holds no sparse mask for the run")
    if getattr(model, "_fedpeft_mask", None) == ins.structure_digest:
        return
    modules = sparse_ft.module_names({k: v.shape for k, v in ins.adapters.items()})
    shapes = sparse_ft.matrix_shapes(model, modules)
    try:
        positions = sparse_ft.mask_from_wire(ins.structure, shapes, sparse_ft.kept(model, modules))
    except (CodecError, KeyError, ModelError) as err:
        raise MissingStructure(f"the sparse mask received does not decode: {err}") from None
    sparse_ft.install_mask(model, positions)
    model.__dict__["_fedpeft_mask"] = ins.structure_digest


def _carried(ins: TrainIns, cfg: Config) -> State:
    """The model's adapter state for the received adapters: as sent, or for LoRA-SB the
    carrier LoRA of the received Rs in this node's basis (lora_B = B R, lora_A = A)."""
    if cfg.peft.method != "lora_sb":
        return ins.adapters
    return lora_sb.to_lora(ins.adapters, _basis(ins))


def _basis(ins: TrainIns) -> State:
    if ins.structure is None:
        raise MissingStructure("this node holds no LoRA-SB basis for the run")
    return lora_sb.basis_from_wire(ins.structure)


class MissingStructure(RuntimeError):
    """A message reached a node that holds no fixed adapter structure (LoRA-SB's basis,
    the sparse mask), or another one: the server sends it again with the node's next
    message."""


def _trained(model: PeftModel, ins: TrainIns, cfg: Config, result_of: Any) -> tuple[Any, State]:
    """Run ``result_of(model)`` (local training) and return its result and the exchanged
    tensors after it. LoRA-SB trains R alone (B and A fixed): the carrier's lora_B is
    B R for the duration, and what is read back is R and the head."""
    if cfg.peft.method != "lora_sb":
        return result_of(model), adapter_state(model)
    lora_sb.attach(model, ins.adapters, _basis(ins))
    try:
        result = result_of(model)
        trained = lora_sb.trained_r(model, ins.adapters)
    finally:
        lora_sb.detach(model, ins.adapters)
    head = {k: v for k, v in adapter_state(model).items() if is_head(k)}
    return result, {**head, **trained}


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
    def build() -> dict[str, Encoded]:
        train_rows, test_rows = client_rows(data, part, model.task, seed, partition_id)
        tok = load_tokenizer(model.name)
        return {
            "train": encode(train_rows, tok, model.max_length),
            "test": encode(test_rows, tok, model.max_length),
        }

    # everything the token ids depend on; a new process per message reads them from disk
    key = {
        "data": dataclasses.asdict(data),
        "sources": [file_stamp(data.source), file_stamp(data.test_source)],
        "partition": dataclasses.asdict(part),
        "tokenizer": model.name,
        "max_length": model.max_length,
        "task": model.task,
        "seed": seed,
        "partition_id": partition_id,
    }
    splits = cached_splits(key, ("train", "test"), build)
    return ClientData(train=splits["train"], test=splits["test"])


def client_data(cfg: Config, partition_id: int) -> ClientData:
    return _client_data(cfg.data, cfg.partition, cfg.model, cfg.seed, partition_id)


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Per (run, round, client) seed for batch order and dropout."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


def train_round(
    ins: TrainIns,
    base_delta: State | None = None,
    history: list[Entry] | None = None,
    examples: Encoded | None = None,
    dp_sgd: bool = False,
) -> tuple[TrainRes, list[Entry]]:
    """Train the received adapters on the partition the server named; return Δ and the
    record-level accountant history (``dp_sgd``: DP-SGD, else unchanged).

    ``base_delta``: the node's merged updates (module -> ΔW), added to the base weights.
    ``examples``: train on these instead of the partition (the audit replays chosen
    batches through the client's real pipeline).
    """
    partition_id = ins.partition_id
    cfg = parse_config(ins.config_json)
    startup_seconds = _startup_seconds()
    started = time.perf_counter()  # a new ClientApp process loads the model; others reuse it
    model = _installed_model(ins, cfg, base_delta or {})
    train_examples = client_data(cfg, partition_id).train if examples is None else examples
    load_seconds = time.perf_counter() - started
    pad_id = load_tokenizer(cfg.model.name).pad_token_id
    seed = round_seed(cfg.seed, ins.server_round, partition_id)
    history = list(history or [])
    if dp_sgd:
        result, history = _train_dp(
            model, train_examples, cfg, pad_id, noise_seed(cfg, ins), history
        )
        after = adapter_state(model)
    else:
        result, after = _trained(
            model, ins, cfg,
            lambda m: train_local(m, train_examples, cfg.train, pad_id, cfg.model.task, seed=seed),
        )  # fmt: skip
    delta = {k: after[k] - ins.adapters[k] for k in ins.adapters}
    res = TrainRes(
        update=delta,
        num_examples=result.num_examples,
        train_loss=result.loss,
        train_seconds=result.seconds,
        load_seconds=load_seconds,
        startup_seconds=startup_seconds,
    )
    return res, history


def burnin_round(ins: TrainIns) -> TrainRes:
    """The burn-in on this node before round 1 (LoRA-SB's initialization, SAM's
    selection): the gradient of every adapted weight, summed over the method's
    ``burnin_steps`` batches at the base model with the task head the server sent, sent
    as its top ``score_density`` entries (sign × one scale per tensor)."""
    cfg = parse_config(ins.config_json)
    started = time.perf_counter()
    model = _model_for(ins, cfg)
    state = adapter_state(model)
    for key in state:  # the adapters at zero are a no-op; the head is the server's
        if not is_head(key):
            state[key] = np.zeros_like(state[key])
    state.update(ins.adapters)
    load_adapter_state(model, state)
    data = client_data(cfg, ins.partition_id).train
    pad_id = load_tokenizer(cfg.model.name).pad_token_id
    shapes = {k: v.shape for k, v in state.items()}
    if cfg.peft.method == "sparse":
        modules = sparse_ft.module_names(shapes)
        steps, density = cfg.sparse.burnin_steps, cfg.sparse.score_density
    else:
        modules = lora_sb.module_names(shapes)
        steps, density = cfg.lora_sb.burnin_steps, cfg.lora_sb.score_density
    sums = summed_weight_gradients(
        model, modules, data, cfg.train, steps, pad_id, cfg.model.task,
        seed=round_seed(cfg.seed, 0, ins.partition_id),
    )  # fmt: skip
    sent, _ = compress(sums, {}, density, "stc")
    return TrainRes(
        update=dense(sent),
        num_examples=steps * min(cfg.train.batch_size, len(data)),
        train_loss=None,
        train_seconds=time.perf_counter() - started,
        compressed=sent,
    )


_started_rounds = 0  # rounds this process has begun


def _startup_seconds() -> float:
    """What this round paid for starting its process: the seconds from the process's start
    to its first round (Python, torch and Flower imports, Flower's FAB install, the message
    pull), and 0 for later rounds in the same process. Always sent, so that a reply's size
    does not depend on which process served it."""
    global _started_rounds
    _started_rounds += 1
    if _started_rounds > 1:
        return 0.0
    born = float(psutil.Process().create_time())
    return max(0.0, time.time() - born)


class BudgetSpent(RuntimeError):
    """This node's privacy budget does not allow another round."""


def _train_dp(
    model: PeftModel,
    data: Encoded,
    cfg: Config,
    pad_id: int,
    seed: int | None,
    history: list[Entry],
) -> tuple[TrainResult, list[Entry]]:
    priv, train = cfg.privacy, cfg.train
    q = sample_rate(len(data), train.batch_size)
    z = record_noise(cfg, len(data))
    if priv.epsilon is not None:
        after = epsilon(add_steps(history, z, q, train.local_steps), priv.delta, priv.accountant)
        if after > priv.epsilon * (1 + 1e-3):  # Opacus's search for z stops within 0.01 of ε
            raise BudgetSpent(f"another round would spend ε = {after:.3g} > {priv.epsilon:g}")
    return train_local_dp(
        model, data, train, noise_multiplier=z, clip_norm=priv.clip_norm, pad_id=pad_id,
        task=cfg.model.task, seed=seed, history=history, accountant=priv.accountant,
    )  # fmt: skip


def record_noise(cfg: Config, num_examples: int) -> float:
    """z of record-level DP-SGD: configured, or what spends ε over every round's steps."""
    priv, train = cfg.privacy, cfg.train
    q = sample_rate(num_examples, train.batch_size)
    steps = cfg.federation.rounds * train.local_steps
    try:
        return noise_multiplier(
            priv.noise_multiplier, priv.epsilon, priv.delta, q, steps, priv.accountant
        )
    except ValueError:  # Opacus: "The privacy budget is too low."
        raise BudgetSpent(
            f"ε = {priv.epsilon:g} is too small for {steps} DP-SGD steps at q = {q:.3g}"
        ) from None


def local_noise(cfg: Config) -> float:
    """σ of local DP (noise std over C): configured, or what spends ε over the rounds.
    Updates clipped to C are at most 2C apart, so the accountant sees σ / 2."""
    priv = cfg.privacy
    if priv.noise_multiplier is not None:
        return priv.noise_multiplier
    rounds = cfg.federation.rounds
    return 2 * noise_multiplier(None, priv.epsilon, priv.delta, 1.0, rounds, priv.accountant)


@dataclass
class Kept:
    """What a node keeps between rounds and never sends: the error-feedback residual and
    its privacy accountant's history."""

    residual: State = dataclasses.field(default_factory=dict)
    history: list[Entry] = dataclasses.field(default_factory=list)


def local_step(cfg: Config, history: list[Entry]) -> list[Entry]:
    """The local-DP history after one more release, or :class:`BudgetSpent`."""
    priv = cfg.privacy
    after = add_steps(history, local_noise(cfg) / 2, 1.0, 1)
    spent = epsilon(after, priv.delta, priv.accountant)
    if priv.epsilon is not None and spent > priv.epsilon * (1 + 1e-3):
        raise BudgetSpent(f"another round would spend ε = {spent:.3g} > {priv.epsilon:g}")
    return after


def private_metrics(res: TrainRes, cfg: Config, history: list[Entry]) -> TrainRes:
    """Under DP a reply carries nothing data-dependent besides the protected update: a
    weight of steps × batch size (the real count would reveal a small n), no loss and no
    timing; plus this node's ε so far (record level, local)."""
    spent = epsilon(history, cfg.privacy.delta, cfg.privacy.accountant) if history else None
    return dataclasses.replace(
        res,
        num_examples=cfg.train.local_steps * cfg.train.batch_size,
        train_loss=None,
        train_seconds=None,
        load_seconds=None,
        startup_seconds=None,
        epsilon=spent,
    )


def noise_seed(cfg: Config, ins: TrainIns) -> int | None:
    seed = cfg.privacy.noise_seed
    return None if seed is None else round_seed(seed, ins.server_round, ins.partition_id)


def reclip_sent(res: TrainRes, residual: State, clip_norm: float) -> tuple[TrainRes, State]:
    """Ternarizing can lengthen a clipped update (every kept entry gets one magnitude):
    scale the per-tensor scales so that what is sent has norm ≤ C again, and keep the
    difference in the residual (with error feedback)."""
    assert res.compressed is not None
    norm = global_norm(res.update)
    if norm <= clip_norm:
        return res, residual
    factor = clip_norm / norm * (1 - 1e-6)
    sent = {k: rescaled(t, factor) for k, t in res.compressed.items()}
    sent_dense = dense(sent)
    if residual:
        residual = {
            k: (residual[k] + res.update[k] - sent_dense[k]).astype(np.float32) for k in residual
        }
    return dataclasses.replace(res, update=sent_dense, compressed=sent), residual


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
    tok = load_tokenizer(cfg.model.name)
    batch = cfg.federation.eval_batch_size
    metrics, _ = score(model, data.test, tok, cfg.eval, batch, cfg.model.task)
    return len(data.test), metrics
