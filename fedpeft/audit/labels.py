"""Attacks on the task head's update.

With cross-entropy over K classes, one gradient step on a batch of B examples with
head inputs h_i (the pooled representations), predictions p_i and one-hot labels y_i
moves the head by

    Δb = −η/B Σ_i (p_i − y_i),        ΔW = −η/B Σ_i (p_i − y_i) h_iᵀ.

- **Label leakage** (iDLG; Zhao et al., 2020, "iDLG: Improved Deep Leakage from
  Gradients"): for B = 1 the true class is the only one whose bias grows, y = argmax Δb.
  For B > 1 and one SGD step the label counts follow from Δb and the mean prediction
  p̄ (LLG; Wainakh et al., 2022): n_c ≈ B (p̄_c + Δb_c / η), with p̄ estimated by the
  global model on public sentences. Otherwise (Adam, several steps) counts are shared
  out in proportion to the positive part of Δb.
- **Head-input recovery** (Geiping et al., 2020, "Inverting Gradients", Prop. D.1;
  Phong et al., 2017): for B = 1 every row satisfies ΔW_c = Δb_c h, so
  h = Σ_c Δb_c ΔW_c / Σ_c Δb_c² exactly; the recovered h is then matched to the nearest
  public candidate sentence by cosine (retrieval).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch

from fedpeft.audit.base import Guess, HeadKeys, Public, head_keys, module_name
from fedpeft.audit.threat import ServerView
from fedpeft.models import load_tokenizer
from fedpeft.train import collate, encode


class LabelLeak:
    name = "labels"

    def unavailable(self, view: ServerView) -> str | None:
        keys = head_keys(view.update, view.num_labels)
        if keys is None or keys.bias is None:
            return "no task-head bias in the update"
        return None

    def run(self, view: ServerView, public: Public) -> Guess:
        keys = head_keys(view.update, view.num_labels)
        assert keys is not None and keys.bias is not None
        delta_b = view.update[keys.bias].astype(np.float64)  # (K,)
        batch = view.cfg.train.batch_size
        train = view.cfg.train
        if batch == 1:
            return Guess(labels=(int(np.argmax(delta_b)),))
        if train.optimizer == "sgd" and train.local_steps == 1 and public.candidates:
            p_bar = mean_prediction(view, public.candidates)
            shares = np.clip(p_bar + delta_b / train.lr, 0.0, None)
            note = "counts from Δb/η + p̄ (one SGD step)"
        else:
            shares = np.clip(delta_b - delta_b.min(), 0.0, None)
            note = "counts in proportion to Δb (not one SGD step)"
        counts = largest_remainder(shares, batch)
        labels = tuple(c for c, n in enumerate(counts) for _ in range(n))
        return Guess(labels=labels, notes=(note,))


class HeadInput:
    name = "head_input"

    def unavailable(self, view: ServerView) -> str | None:
        return LabelLeak().unavailable(view)

    def run(self, view: ServerView, public: Public) -> Guess:
        keys = head_keys(view.update, view.num_labels)
        assert keys is not None and keys.bias is not None
        recovered = recover_head_input(view.update, keys)[None, :]  # (1, d)
        if not public.candidates:
            return Guess(head_inputs=recovered)
        pool = head_inputs(view, list(public.candidates))  # (N, d)
        best = int(np.argmax(cosine_matrix(recovered, pool)[0]))
        return Guess(head_inputs=recovered, texts=(public.candidates[best],))


def recover_head_input(update: dict[str, np.ndarray], keys: HeadKeys) -> np.ndarray:
    """h with ΔW_c = Δb_c h for every class c, in the least-squares sense."""
    assert keys.bias is not None
    delta_w = update[keys.weight].astype(np.float64)  # (K, d)
    delta_b = update[keys.bias].astype(np.float64)  # (K,)
    denom = float(delta_b @ delta_b)
    if denom == 0.0:
        return np.zeros(delta_w.shape[1])
    return np.asarray(delta_b @ delta_w / denom)


def largest_remainder(shares: np.ndarray, total: int) -> list[int]:
    """Integer counts summing to ``total`` in proportion to ``shares``."""
    if shares.sum() <= 0:
        shares = np.ones_like(shares)
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(int)
    for c in np.argsort(-(exact - counts))[: total - int(counts.sum())]:
        counts[c] += 1
    return [int(n) for n in counts]


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) cosine similarities."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.asarray(a @ b.T)


def head_inputs(view: ServerView, texts: list[str]) -> np.ndarray:
    """(N, d) inputs of the task head for ``texts`` under the model the client started
    from (what a server can compute for any sentence it can think of)."""
    digest = hashlib.sha256(repr(view.cfg.model).encode())  # name, pooling, length
    for key in sorted(view.sent):
        digest.update(key.encode() + view.sent[key].tobytes())
    for text in texts:
        digest.update(text.encode() + b"\0")
    key = digest.hexdigest()
    if key not in _POOL_CACHE:  # a sweep scores the same pool against the same model often
        if len(_POOL_CACHE) >= 4:
            _POOL_CACHE.pop(next(iter(_POOL_CACHE)))
        _POOL_CACHE[key] = _head_inputs(view, texts)
    return _POOL_CACHE[key]


_POOL_CACHE: dict[str, np.ndarray] = {}


@torch.no_grad()
def _head_inputs(view: ServerView, texts: list[str]) -> np.ndarray:
    model = view.global_model()
    keys = head_keys(view.sent, view.num_labels)
    assert keys is not None
    head = model.get_submodule(module_name(keys.weight))
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    try:
        for _ in _forward(view, model, texts):
            pass
    finally:
        handle.remove()
    return torch.cat(captured).double().numpy()


@torch.no_grad()
def mean_prediction(view: ServerView, texts: tuple[str, ...]) -> np.ndarray:
    """p̄: the global model's mean softmax over public sentences."""
    model = view.global_model()
    probs = [torch.softmax(logits, dim=-1) for logits in _forward(view, model, list(texts[:256]))]
    return torch.cat(probs).mean(0).double().numpy()


def _forward(view: ServerView, model: torch.nn.Module, texts: list[str]) -> Iterator[torch.Tensor]:
    """The model's logits on ``texts``, 64 sentences at a time."""
    tok = load_tokenizer(view.cfg.model.name)
    data = encode([{"text": t, "label": 0} for t in texts], tok, view.cfg.model.max_length)
    for start in range(0, len(data), 64):
        index = list(range(start, min(start + 64, len(data))))
        yield model(**collate(data, index, tok.pad_token_id, "classification")).logits
