"""Local training and evaluation: a flat loop, one comment per phase.

Batches are padded to their own longest sequence (dynamic padding), which on short
texts is most of the speed on a CPU. A causal LM's logits are computed only at the
positions a target token follows (transformers' ``logits_to_keep``): an instruction's
loss covers its answer, and on a small model with a large vocabulary (SmolLM2: 49k
words, 576 wide) the output layer over every position is a fifth of a training step.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs)."""
    inner: Any = getattr(model, "_module", model)  # under Opacus, its GradSampleModule
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
    return _takes_logits_to_keep(type(base).forward)


@functools.cache
def _takes_logits_to_keep(forward: Any) -> bool:
    # once per model class (its unbound forward): this is asked at every training step
    return "logits_to_keep" in inspect.signature(forward).parameters


def lm_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's logits (B, P, V) at the positions P some row's next token is a
    target at, and those next tokens (B, P), -100 where a row has none there."""
    following = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not _keeps_logits(model):
        return model(**inputs).logits[:, :-1], following
    kept = (following != instruct.IGNORE).any(0).nonzero().squeeze(1)  # (P,)
    return model(**inputs, logits_to_keep=kept).logits, following[:, kept]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy over the targets (-100 ignored), in fp32 as transformers does."""
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=instruct.IGNORE,
        reduction=reduction,
    )  # fmt: skip


def forward_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training loss of a batch, and a classifier's logits (None for a causal LM)."""
    if task == "classification":
        out = model(**batch)
        return out.loss, out.logits
    return lm_loss(*lm_logits(model, batch)), None


def training_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    task: str,
    log_prior: torch.Tensor | None,
    logit_adjustment: float,
) -> torch.Tensor:
    """The local objective: the task loss, for a classifier with its logits adjusted by
    ``logit_adjustment`` × log π of the client's labels (FedLC) when that is > 0."""
    loss, logits = forward_loss(model, batch, task)
    if logits is not None and log_prior is not None and logit_adjustment > 0:
        adjusted = logits.float() + logit_adjustment * log_prior  # (B, K)
        loss = torch.nn.functional.cross_entropy(adjusted, batch["labels"])
    return loss


def label_prior(data: Encoded, model: torch.nn.Module, task: str) -> torch.Tensor | None:
    """log π of a classifier's client labels (None for a causal LM)."""
    return _log_label_prior(data, model) if task == "classification" else None


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The local optimizer of ``train.optimizer`` over the trainable parameters."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


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
            loss = training_loss(model, batch, task, log_prior, cfg.logit_adjustment)
        # backward + step
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
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
    total_loss, correct, count, tokens = 0.0, 0, 0, 0
    for index, batch in _held_out_batches(model, data, batch_size, pad_id, task):
        if task == "classification":
            out = model(**batch)
            total_loss += float(out.loss) * len(index)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            count += len(index)
        else:
            logits, targets = lm_logits(model, batch)
            total_loss += float(lm_loss(logits, targets, reduction="sum"))
            tokens += int((targets != instruct.IGNORE).sum())
    if task == "classification":
        return {"accuracy": correct / max(count, 1), "loss": total_loss / max(count, 1)}
    return _token_metrics(total_loss, tokens)


def _held_out_batches(
    model: torch.nn.Module, data: Encoded, batch_size: int, pad_id: int, task: str
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(row indices, batch on the model's device) in length order, so that little
    compute goes to padding; the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device  # fp32, wherever training left the model
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield index, {k: v.to(device) for k, v in collate(data, index, pad_id, task).items()}


def _token_metrics(total_loss: float, tokens: int) -> dict[str, float]:
    loss = total_loss / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def score(
    model: torch.nn.Module,
    data: Encoded,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig,
    batch_size: int,
    task: str,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """A round's held-out metrics, and for instructions its (prompt, reference,
    generation) samples: :func:`instruction_metrics` or :func:`evaluate`."""
    if task == "causal_lm" and data.prompts is not None and data.references is not None:
        return instruction_metrics(model, data, tokenizer, cfg, batch_size)
    return evaluate(model, data, batch_size, int(tokenizer.pad_token_id), task), []


def _last_answer(targets: list[int]) -> list[int]:
    """The ids of a row's last assistant turn: its targets after the last -100 (all of
    them when truncation left no prompt)."""
    if instruct.IGNORE not in targets:
        return targets
    return targets[len(targets) - targets[::-1].index(instruct.IGNORE) :]


def _settled(
    predicted: list[int], data: Encoded, i: int, eos_id: int | None, max_new_tokens: int
) -> list[int] | None:
    """Row i's greedy answer if teacher forcing already decides it, else None.

    Greedy decoding after the prompt emits the argmax token, then continues from it. So
    if the argmax at every position of the reference answer, through its end-of-answer
    token, is the reference's next token, decoding reproduces the reference and stops
    there (within ``max_new_tokens``). This needs the row's context to be the prompt
    generation starts from (not so for a row truncated on the left)."""
    assert data.targets is not None and data.prompts is not None
    answer = _last_answer(data.targets[i])
    if eos_id is None or eos_id not in answer:
        return None
    end = answer.index(eos_id) + 1
    start = len(data.input_ids[i]) - len(answer)
    if end > max_new_tokens or data.input_ids[i][:start] != data.prompts[i]:
        return None
    if predicted[len(predicted) - len(answer) :][:end] != answer[:end]:
        return None
    return answer[: end - 1]


@torch.no_grad()
def instruction_metrics(
    model: torch.nn.Module,
    data: Encoded,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig,
    batch_size: int,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Token loss and perplexity on the held-out responses, exact match of the greedy
    answers to the first ``cfg.generate_examples`` prompts, and the first
    ``cfg.samples`` (prompt, reference, generation) triples.

    One teacher-forced pass gives the loss and settles every answer whose greedy
    decoding it already determines (:func:`_settled`: a trained model's usual case);
    only the others, and the samples, are generated. The exact match is that of greedy
    decoding of every prompt, up to ties between logits broken differently by padding.
    """
    assert data.targets is not None and data.prompts is not None and data.references is not None
    pad_id = int(tokenizer.pad_token_id)
    eos_id = instruct.end_of_answer(tokenizer)[1]
    n = min(cfg.generate_examples, len(data))
    answers: dict[int, list[int]] = {}
    total_loss, tokens = 0.0, 0
    for index, batch in _held_out_batches(model, data, batch_size, pad_id, "causal_lm"):
        logits, targets = lm_logits(model, batch)
        total_loss += float(lm_loss(logits, targets, reduction="sum"))
        tokens += int((targets != instruct.IGNORE).sum())
        predicted = logits.argmax(-1)  # (B, P)
        for row, i in enumerate(index):
            if cfg.samples <= i < n:  # the samples are always generated
                at = predicted[row][targets[row] != instruct.IGNORE].tolist()
                settled = _settled(at, data, i, eos_id, cfg.max_new_tokens)
                if settled is not None:
                    answers[i] = settled
    metrics = _token_metrics(total_loss, tokens)
    if n == 0:
        return metrics, []
    rest = [i for i in range(n) if i not in answers]
    generated = instruct.generate(
        model, [data.prompts[i] for i in rest], pad_id=pad_id, eos_id=eos_id,
        max_new_tokens=cfg.max_new_tokens, batch_size=batch_size,
    )  # fmt: skip
    answers.update(zip(rest, generated, strict=True))
    log.debug("Exact match: %d of %d answers generated, the rest settled", len(rest), n)
    texts = tokenizer.batch_decode([answers[i] for i in range(n)], skip_special_tokens=True)
    hits = sum(instruct.exact_match(t, r) for t, r in zip(texts, data.references, strict=False))
    samples = [
        {
            "prompt": str(tokenizer.decode(data.prompts[i], skip_special_tokens=False)),
            "reference": data.references[i],
            "generation": texts[i],
        }
        for i in range(min(cfg.samples, n))
    ]
    return {**metrics, "exact_match": hits / n}, samples


def summed_weight_gradients(
    model: torch.nn.Module,
    modules: list[str],
    data: Encoded,
    cfg: TrainConfig,
    steps: int,
    pad_id: int,
    task: str,
    seed: int,
) -> dict[str, np.ndarray]:
    """module -> Σ over ``steps`` batches of ∂loss/∂W0 (m×n) of each adapted module (a
    peft layer, its W0 in ``base_layer``), at the model as given (its adapters a no-op),
    with the training objective and no step taken: a burn-in's scores (LoRA-SB's
    initialization, SAM's selection)."""
    if len(data) == 0:
        raise ValueError("A client with no training examples cannot run the burn-in.")
    weights = {m: _adapted(model, m).base_layer.weight for m in modules}
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    log_prior = label_prior(data, model, task)
    rng = np.random.default_rng(seed)
    try:
        model.train()
        torch.manual_seed(seed)  # dropout
        # the base layers alone: an adapter may add W0 detached (SHiRA adds to W0.data),
        # which would cut the gradient to W0; at zero the adapters add nothing anyway
        with _adapters_off(model):
            for index in batch_indices(len(data), cfg.batch_size, steps, rng):
                batch = collate(data, index, pad_id, task)
                loss = training_loss(model, batch, task, log_prior, cfg.logit_adjustment)
                loss.backward()  # type: ignore[no-untyped-call]
        sums: dict[str, np.ndarray] = {}
        for module, w in weights.items():
            grad = w.grad if w.grad is not None else torch.zeros_like(w)
            # nn.Linear stores (out, in); GPT-2's Conv1D (in, out)
            linear = isinstance(_adapted(model, module).base_layer, torch.nn.Linear)
            sums[module] = (grad if linear else grad.T).detach().float().cpu().numpy().copy()
    finally:
        model.eval()
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        for p in trainable:
            p.requires_grad_(True)
    return sums


def _adapters_off(model: torch.nn.Module) -> Any:
    """peft's ``disable_adapter()`` context (a no-op for a plain model)."""
    off = getattr(model, "disable_adapter", None)
    return off() if off is not None else contextlib.nullcontext()


def _adapted(model: torch.nn.Module, module: str) -> Any:
    return model.get_submodule(module)  # peft's state-dict names are full paths
