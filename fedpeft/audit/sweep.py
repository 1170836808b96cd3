"""``fedpeft audit CONFIG``: every attack against every defense, on the same batches.

For each defense (config overrides on top of the run config), setting (fedSGD: one
step; fedAvg: ``train.local_steps`` steps) and batch size, ``audit.trials`` client
batches are drawn once from the training data and replayed through the client's real
round (:func:`fedpeft.audit.threat.observe`); each attack gets the server's view, the
scorer the batch. Writes ``audit.json`` (every trial and the means) and, through
:mod:`fedpeft.audit.report`, ``audit.md`` and ``plots/leakage.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.audit import ATTACKS, Attack, Public, build_attack
from fedpeft.audit.base import head_keys
from fedpeft.audit.report import write_report
from fedpeft.audit.scoring import score
from fedpeft.audit.threat import Secret, ServerView, initial_adapters, observe, warmed_adapters
from fedpeft.audit.tokens import EMBEDDING_A, first_layer_keys
from fedpeft.config import Config, ConfigError, LoraConfig, config_from_dict
from fedpeft.data import Row, load_dataset
from fedpeft.wire import State

log = logging.getLogger("fedpeft")


@dataclass(frozen=True)
class Cell:
    defense: str
    setting: str
    batch_size: int


def defended(cfg: Config, name: str, overrides: Mapping[str, Any]) -> Config:
    """The config with one defense's overrides merged in (a bad one names the defense)."""
    raw = cfg.to_dict()
    _merge(raw, overrides)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"Audit defense '{name}': {err}") from err


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def in_setting(cfg: Config, setting: str) -> Config:
    steps = 1 if setting == "fedsgd" else cfg.train.local_steps
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_steps=steps))


def draw_batches(
    cfg: Config, rows: list[Row]
) -> tuple[dict[tuple[int, int], list[Row]], list[Row]]:
    """(batch size, trial) -> rows, disjoint across batches; and the rows left (public)."""
    a = cfg.audit
    need = sum(a.batch_sizes) * a.trials
    if need > len(rows) // 2:
        raise ConfigError(
            f"The audit needs {need} training examples for its batches, more than half of "
            f"the {len(rows)} in '{cfg.data.source}'; lower 'audit.trials' or 'audit.batch_sizes'."
        )
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    batches, pos = {}, 0
    for b in a.batch_sizes:
        for t in range(a.trials):
            batches[(b, t)] = [rows[i] for i in order[pos : pos + b]]
            pos += b
    return batches, [rows[i] for i in order[pos:]]


def candidate_pool(
    cfg: Config, batches: dict[tuple[int, int], list[Row]], public: list[Row]
) -> Public:
    """Public sentences: the clients' own (a retrieval attacker's best case) plus others."""
    own = [str(r["text"]) for rows in batches.values() for r in rows]
    others = [str(r["text"]) for r in public[: cfg.audit.candidates]]
    return Public(candidates=tuple(dict.fromkeys(own + others)))


def exposure(view: ServerView, secret: Secret) -> dict[str, Any]:
    """Indicators that need no attack: which parts travel, and how their ranks compare
    with what the batch holds."""
    first = first_layer_keys(view.update)
    first_rank = sum(_numerical_rank(view.update[k]) for k in first)
    return {
        "head": head_keys(view.update, view.num_labels) is not None,
        "embedding_lora": any(EMBEDDING_A in k for k in view.update),
        "first_layer_lora": bool(first),
        "first_layer_update_rank": first_rank,
        "first_layer_lora_rank": sum(view.update[k].shape[0] for k in first),
        "token_positions": sum(len(ids) for ids in secret.input_ids),
        "update_norm": float(
            np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in view.update.values()))
        ),
    }


def _numerical_rank(m: np.ndarray) -> int:
    s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    return int(np.sum(s > 1e-6 * s[0])) if s.size and s[0] > 0 else 0


def run_audit(cfg: Config, out_dir: Path) -> dict[str, Any]:
    if cfg.peft.method != "lora":
        raise ConfigError(
            f"The audit attacks LoRA updates; it does not apply to 'peft.method: "
            f"{cfg.peft.method}' yet."
        )
    unknown = [n for n in cfg.audit.attacks if n not in ATTACKS]
    if unknown:
        raise ConfigError(
            f"'audit.attacks' names unknown attack '{unknown[0]}'; known: {', '.join(ATTACKS)}."
        )
    attacks = [build_attack(n) for n in cfg.audit.attacks]
    defenses = {n: defended(cfg, n, o) for n, o in cfg.audit.defenses.items()}
    dataset = load_dataset(cfg.data, cfg.model.task, cfg.seed)
    batches, public_rows = draw_batches(cfg, dataset.train)
    public = candidate_pool(cfg, batches, public_rows)
    trials: list[dict[str, Any]] = []
    sent_for: dict[LoraConfig, State] = {}
    for name, dcfg in defenses.items():
        for setting in cfg.audit.settings:
            scfg = in_setting(dcfg, setting)
            if scfg.lora not in sent_for:
                sent_for[scfg.lora] = _sent(scfg, dataset.num_labels, public_rows)
            for (b, t), rows in batches.items():
                cell = Cell(name, setting, b)
                view, secret = observe(
                    scfg,
                    rows,
                    sent_for[scfg.lora],
                    scfg.lora,
                    dataset.num_labels,
                    server_round=t + 1,
                )
                trials += _attack_all(attacks, view, secret, public, cell, t)
            log.info("audit: %s, %s done", name, setting)
    summary = {
        "threat_model": THREAT_MODEL,
        "cells": summarize(trials),
        "trials": trials,
        "config": cfg.to_dict(),
        "candidates": len(public.candidates),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "audit.json").write_text(json.dumps(summary, indent=1))
    write_report(summary, out_dir)
    return summary


def _sent(cfg: Config, num_labels: int, public_rows: list[Row]) -> State:
    if cfg.audit.warmup_steps == 0:
        return initial_adapters(cfg, cfg.lora, num_labels)
    return warmed_adapters(cfg, cfg.lora, num_labels, public_rows, cfg.audit.warmup_steps)


def _attack_all(
    attacks: list[Attack], view: ServerView, secret: Secret, public: Public, cell: Cell, trial: int
) -> list[dict[str, Any]]:
    base = {**dataclasses.asdict(cell), "trial": trial, "exposure": exposure(view, secret)}
    out = []
    for attack in attacks:
        why = attack.unavailable(view)
        if why is not None:
            out.append({**base, "attack": attack.name, "unavailable": why})
            continue
        start = time.perf_counter()
        guess = attack.run(view, public)
        seconds = time.perf_counter() - start
        out.append(
            {
                **base,
                "attack": attack.name,
                "scores": score(guess, secret, view),
                "seconds": seconds,
                "notes": list(guess.notes),
            }
        )
    return out


def summarize(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of every score per (defense, setting, batch size, attack) over the trials the
    attack could run on (``scored`` of ``trials``)."""
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for t in trials:
        groups.setdefault((t["defense"], t["setting"], t["batch_size"], t["attack"]), []).append(t)
    cells = []
    for (defense, setting, b, attack), group in groups.items():
        scored = [g for g in group if "scores" in g]
        row: dict[str, Any] = {
            "defense": defense,
            "setting": setting,
            "batch_size": b,
            "attack": attack,
            "trials": len(group),
            "scored": len(scored),
        }
        if not scored:
            row["unavailable"] = group[0]["unavailable"]
        else:
            keys = sorted({k for g in scored for k in g["scores"]})
            row["scores"] = {
                k: float(np.mean([g["scores"][k] for g in scored if k in g["scores"]]))
                for k in keys
            }
            row["seconds"] = float(np.mean([g["seconds"] for g in scored]))
        cells.append(row)
    return cells


THREAT_MODEL = (
    "An honest-but-curious server. Each attack reads only what the server received from "
    "one client in one round: the decoded update after the client's clipping, local noise "
    "and compression (and the server's own re-clip under user-level DP; the server sees "
    "that clipped update before adding its central noise), the adapters it sent, the "
    "round's configuration, and public knowledge: the base model, its tokenizer and a "
    "pool of candidate sentences that contains the client's own (a retrieval attacker's "
    "best case). The client's batch is read only to score the guesses."
)
