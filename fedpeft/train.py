"""Local training and evaluation: a flat loop, one comment per phase.

Batches are padded to their own longest sequence (dynamic padding), which on short
texts is most of the speed on a CPU.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedpeft import accel, instruct
from fedpeft.config import EvalConfig, TrainConfig
from fedpeft.data import Row

log = logging.getLogger("fedpeft")


@dataclass(frozen=True)
class Encoded:
    """Tokenized examples: token id lists (unpadded) and labels.

    Instructions (rows with ``messages``) also carry ``targets``, the token labels
    (-100 outside the responses), ``prompts``, what a model answers after, and
    ``references``, the expected answers."""

    input_ids: list[list[int]]
    labels: list[int]
    targets: list[list[int]] | None = None
    prompts: list[list[int]] | None = None
    references: list[str] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    steps: int
    seconds: float


def encode(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int, progress_s: float = 5.0
) -> Encoded:
    """Each row's token ids, truncated to ``max_length``; while that takes long (many rows
    on a slow CPU) a log line every ``progress_s`` seconds says how far it got."""
    if not rows:  # e.g. no held-out rows (client_test_fraction 0); tokenizers reject []
        return Encoded(input_ids=[], labels=[])
    if "messages" in rows[0]:
        return encode_instructions(rows, tokenizer, max_length, progress_s)
    texts = [r["text"] for r in rows]
    ids: list[list[int]] = []
    start = last = time.perf_counter()
    for lo in range(0, len(texts), _CHUNK_ROWS):
        ids += _token_ids(texts[lo : lo + _CHUNK_ROWS], tokenizer, max_length)
        now = time.perf_counter()
        if now - last >= progress_s or (last > start and len(ids) == len(texts)):
            log.info("Tokenized %d of %d rows (%.0f s)", len(ids), len(texts), now - start)
            last = now
    return Encoded(input_ids=ids, labels=[int(r.get("label", 0)) for r in rows])


def encode_instructions(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase, max_length: int, progress_s: float = 5.0
) -> Encoded:
    """Chat rows through the tokenizer's chat template, trained on the responses only. A
    row longer than ``max_length`` loses the start of its prompt; one whose response
    alone is longer is left out, with a warning (it would train nothing)."""
    ids, targets, prompts, refs, labels = [], [], [], [], []
    dropped = 0
    start = last = time.perf_counter()
    for n, row in enumerate(rows, 1):
        chat = [
            {**t, "content": text_head(t["content"], _CONTENT_CHARS * max_length)}
            for t in row["messages"]
        ]
        full, trained = instruct.chat_tokens(tokenizer, chat)
        cut = instruct.truncate(full, trained, max_length)
        if cut is None:
            dropped += 1
            continue
        ids.append(cut[0])
        targets.append(cut[1])
        # the last answer starts after the last ignored id: before it is prompt_tokens
        answer = len(trained) - trained[::-1].index(instruct.IGNORE)
        prompts.append(instruct.truncate_prompt(full[:answer], max_length))
        refs.append(instruct.reference(chat))
        labels.append(int(row.get("label", 0)))
        now = time.perf_counter()
        if now - last >= progress_s:
            log.info("Tokenized %d of %d instructions (%.0f s)", n, len(rows), now - start)
            last = now
    if dropped:
        log.warning(
            "%d of %d instructions left out: their response alone is longer than "
            "model.max_length (%d tokens)", dropped, len(rows), max_length,
        )  # fmt: skip
    return Encoded(ids, labels, targets=targets, prompts=prompts, references=refs)


_CHUNK_ROWS = 1000  # rows per tokenizer call: a progress line can follow any of them
# First guess of a head's length, in characters per token of max_length: about twice
# English prose's ~4.5 under WordPiece; a guess that falls short is doubled (_token_ids)
HEAD_CHARS_PER_TOKEN = 8
# A turn's content is cut to this many characters per token of max_length before it is
# rendered, a bound on the tokenizer's work for a huge row: a turn that long has more
# than max_length tokens in any prose (a head of the text, as in _token_ids)
_CONTENT_CHARS = 2 * HEAD_CHARS_PER_TOKEN
_CUT = re.compile(r"\S ")  # a non-space, then the space a head ends before


def text_head(text: str, chars: int) -> str:
    """``text`` up to the first space, ``chars`` characters in or later, that follows a
    non-space; all of ``text`` if there is none or the head would be more than half of it
    (reading the rest costs less than checking that head and then reading it all)."""
    found = _CUT.search(text, max(chars - 1, 0))
    if found is None or 2 * (found.start() + 1) > len(text):
        return text
    return text[: found.start() + 1]


def _token_ids(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[list[int]]:
    """Token ids of each text truncated to ``max_length``, read from a head of the text.

    A fast tokenizer normalizes and splits the *whole* text before it truncates (over a
    second per MB here), so one 60 MB row took minutes. Why a head gives the same ids:

    * The head ends before a space that follows a non-space, and the tokens of such a
      head are the first tokens of the whole text: the packaged MiniLM tokenizer (which
      tiny-bert and tiny-gpt2 borrow) normalizes character by character (NFD for the
      accents never reorders across a space) and cuts words at every space before
      WordPiece sees them; byte-level BPE (GPT-2) has no pre-token that runs from a
      non-space into a space, and SentencePiece's Metaspace starts a piece at each space.
    * No number of characters holds max_length tokens for sure: a word longer than
      WordPiece's max_input_chars_per_word (100) is one [UNK] however long it is,
      control characters and accents are dropped and whitespace runs make no token. So
      the tokenizer checks each head: one with more than max_length tokens has the text's
      first max_length (with one to spare, for a tokenizer whose pieces could cross the
      cut); a shorter head is doubled until it has them or is the whole text.

    A head is so at most twice as long as needed. A text is read whole when its first
    max_length tokens need more than half of it (e.g. after a 60 MB run of spaces): the
    heads checked before add up to less than the text, so that is under twice the work
    of the old whole-text call, and most often the same. Left truncation keeps a text's
    end: such a tokenizer gets whole texts.
    """
    if tokenizer.truncation_side != "right":
        return list(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"])
    heads = [text_head(t, HEAD_CHARS_PER_TOKEN * max_length) for t in texts]
    cut = [i for i, head in enumerate(heads) if len(head) < len(texts[i])]
    while cut:
        probe = tokenizer([heads[i] for i in cut], truncation=True, max_length=max_length + 1)
        cut = [i for i, ids in zip(cut, probe["input_ids"], strict=True) if len(ids) <= max_length]
        for i in cut:
            heads[i] = text_head(texts[i], 2 * len(heads[i]))
        cut = [i for i in cut if len(heads[i]) < len(texts[i])]
    return list(tokenizer(heads, truncation=True, max_length=max_length)["input_ids"])


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
    elif data.targets is not None:  # instructions: the response tokens only
        labels = torch.full((len(seqs), width), instruct.IGNORE, dtype=torch.long)
        for row, i in enumerate(index):
            labels[row, : len(data.targets[i])] = torch.tensor(data.targets[i])
    else:  # causal LM on plain text: predict every real token, ignore padding
        labels = ids.masked_fill(mask == 0, instruct.IGNORE)
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
    device = accel.resolve_device(cfg.device)
    dtype = accel.autocast_dtype(device, cfg.precision)
    model.to(device)  # before the optimizer takes the parameters
    log_prior = _log_label_prior(data, model).to(device) if task == "classification" else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scaler = accel.grad_scaler(device, dtype)  # fp16 only; a pass-through otherwise
    model.train()
    losses = []
    seen = 0
    for index in batch_indices(len(data), cfg.batch_size, cfg.local_steps, rng):
        # forward
        batch = {k: v.to(device) for k, v in collate(data, index, pad_id, task).items()}
        with accel.autocast(device, dtype):
            out = model(**batch)
            loss = out.loss
            if log_prior is not None and cfg.logit_adjustment > 0:
                adjusted = out.logits.float() + cfg.logit_adjustment * log_prior  # (B, K)
                loss = torch.nn.functional.cross_entropy(adjusted, batch["labels"])
        # backward + step
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
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
    device = next(model.parameters()).device  # fp32, wherever training left the model
    total_loss, correct, count, tokens = 0.0, 0, 0, 0
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(data, index, pad_id, task).items()}
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


def generation_metrics(
    model: torch.nn.Module,
    data: Encoded,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig,
    batch_size: int,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Exact match of greedy answers to the first ``cfg.generate_examples`` held-out
    prompts, and the first ``cfg.samples`` (prompt, reference, generation) triples."""
    if data.prompts is None or data.references is None or cfg.generate_examples == 0:
        return {}, []
    n = min(cfg.generate_examples, len(data.prompts))
    if n == 0:
        return {}, []
    answers = instruct.generate(
        model,
        data.prompts[:n],
        pad_id=int(tokenizer.pad_token_id),
        eos_id=instruct.end_of_answer(tokenizer)[1],
        max_new_tokens=cfg.max_new_tokens,
        batch_size=batch_size,
    )
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    hits = sum(instruct.exact_match(t, r) for t, r in zip(texts, data.references, strict=False))
    samples = [
        {
            "prompt": str(tokenizer.decode(data.prompts[i], skip_special_tokens=False)),
            "reference": data.references[i],
            "generation": texts[i],
        }
        for i in range(min(cfg.samples, n))
    ]
    return {"exact_match": hits / n}, samples
