"""Local training and evaluation: a flat loop, one comment per phase.

Batches are padded to their own longest sequence (dynamic padding), which on short
texts is most of the speed on a CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedpeft.config import TrainConfig
from fedpeft.data import Row


@dataclass(frozen=True)
class Encoded:
    """Tokenized examples: token id lists (unpadded) and labels."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    steps: int
    seconds: float


def encode(rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    if not rows:  # e.g. no held-out rows (client_test_fraction 0); tokenizers reject []
        return Encoded(input_ids=[], labels=[])
    ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)["input_ids"]
    return Encoded(input_ids=list(ids), labels=[int(r.get("label", 0)) for r in rows])


def collate(
    data: Encoded, index: np.ndarray | list[int], pad_id: int, task: str
) -> dict[str, torch.Tensor]:
    seqs = [data.input_ids[i] for i in index]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    if task == "classification":
        labels = torch.tensor([data.labels[i] for i in index])
    else:  # causal LM: predict every real token, ignore padding
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_indices(
    n: int, batch_size: int, steps: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """``steps`` batches from reshuffled passes over ``n`` examples."""
    order = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        yield order[pos : pos + min(batch_size, n)]
        pos += batch_size


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The local optimizer of ``train.optimizer`` over the trainable parameters."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_local(
    model: torch.nn.Module,
    data: Encoded,
    cfg: TrainConfig,
    pad_id: int,
    task: str,
    seed: int,
) -> TrainResult:
    """``cfg.local_steps`` optimizer steps on the trainable (adapter) parameters."""
    if len(data) == 0:
        raise ValueError("A client with no training examples cannot train.")
    start = time.perf_counter()
    torch.manual_seed(seed)  # dropout
    rng = np.random.default_rng(seed)
    log_prior = _log_label_prior(data, model) if task == "classification" else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    model.train()
    losses = []
    seen = 0
    for index in batch_indices(len(data), cfg.batch_size, cfg.local_steps, rng):
        # forward
        batch = collate(data, index, pad_id, task)
        out = model(**batch)
        loss = out.loss
        if log_prior is not None and cfg.logit_adjustment > 0:
            adjusted = out.logits + cfg.logit_adjustment * log_prior  # (B, K)
            loss = torch.nn.functional.cross_entropy(adjusted, batch["labels"])
        # backward + step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        seen += len(index)
    model.eval()
    return TrainResult(
        loss=float(np.mean(losses)),
        num_examples=seen,
        steps=len(losses),
        seconds=time.perf_counter() - start,
    )


def _log_label_prior(data: Encoded, model: torch.nn.Module) -> torch.Tensor:
    """log π of this client's labels, add-one smoothed over the model's classes."""
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", max(data.labels) + 1))
    counts = torch.bincount(torch.tensor(data.labels), minlength=num_labels).float() + 1.0
    return torch.log(counts / counts.sum())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Encoded, batch_size: int, pad_id: int, task: str
) -> dict[str, float]:
    """Accuracy and mean loss (classification) or token loss and perplexity (causal LM).

    Examples are batched in length order so that little compute goes to padding; the
    metrics are sums over examples, so the order does not change them.
    """
    model.eval()
    total_loss, correct, count, tokens = 0.0, 0, 0, 0
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = collate(data, index, pad_id, task)
        out = model(**batch)
        if task == "classification":
            total_loss += float(out.loss) * len(index)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            count += len(index)
        else:
            n_tok = int((batch["labels"][:, 1:] != -100).sum())
            total_loss += float(out.loss) * n_tok
            tokens += n_tok
    if task == "classification":
        return {"accuracy": correct / max(count, 1), "loss": total_loss / max(count, 1)}
    loss = total_loss / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
