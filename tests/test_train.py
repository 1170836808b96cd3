"""The local training loop learns; evaluation reports the right metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedpeft.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
from fedpeft.data import load_dataset
from fedpeft.models import adapter_state, build_peft_model, load_tokenizer
from fedpeft.train import batch_indices, collate, encode, evaluate, train_local


def test_batch_indices_cover_each_pass() -> None:
    batches = list(batch_indices(10, 4, 5, np.random.default_rng(0)))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4]
    assert len(set(np.concatenate(batches[:2]).tolist())) == 8  # no repeats within a pass


def test_classification_training_changes_adapters_and_lowers_loss() -> None:
    mc = ModelConfig(name="tiny-bert", max_length=32)
    ds = load_dataset(DataConfig(synthetic_samples=300, synthetic_classes=2), "classification", 0)
    tok = load_tokenizer(mc.name)
    data = encode(ds.train, tok, mc.max_length)
    model = build_peft_model(mc, LoraConfig(r=4), ds.num_labels)
    before = adapter_state(model)
    loss0 = evaluate(model, data, 64, tok.pad_token_id, "classification")["loss"]
    result = train_local(
        model,
        data,
        TrainConfig(local_steps=30, batch_size=16, lr=5e-3),
        tok.pad_token_id,
        "classification",
        0,
    )
    after = adapter_state(model)
    assert result.steps == 30 and result.num_examples == 480
    assert any(not np.array_equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert evaluate(model, data, 64, tok.pad_token_id, "classification")["loss"] < loss0


def _one_step(cfg: TrainConfig) -> tuple[dict, dict, dict]:  # type: ignore[type-arg]
    """The gradient of one batch of a tiny model, and its trainable tensors before and
    after ``train_local`` takes one step of ``cfg`` on that batch."""
    import torch

    mc = ModelConfig(name="tiny-bert", max_length=32)
    ds = load_dataset(DataConfig(synthetic_samples=40, synthetic_classes=2), "classification", 0)
    tok = load_tokenizer(mc.name)
    data = encode(ds.train[:4], tok, mc.max_length)
    model = build_peft_model(mc, LoraConfig(r=4), ds.num_labels)
    for module in model.modules():  # the step runs in training mode: no dropout draws
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.zero_grad()
    model(**collate(data, list(range(4)), tok.pad_token_id, "classification")).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.detach().clone() for n, p in trainable.items()}  # type: ignore[union-attr]
    before = {n: p.detach().clone() for n, p in trainable.items()}
    train_local(
        model,
        data,
        dataclasses.replace(cfg, local_steps=1, batch_size=4),
        tok.pad_token_id,
        "classification",
        0,
    )
    return grads, before, {n: p.detach().clone() for n, p in trainable.items()}


def test_one_sgd_step_is_minus_lr_times_the_gradient() -> None:
    """train.optimizer: sgd keeps the update linear in the gradient (fedSGD), which the
    gradient-inversion audit relies on: Δ = −lr ∇L on every trainable tensor."""
    import torch

    grads, before, after = _one_step(TrainConfig(lr=0.1, optimizer="sgd"))
    for name, g in grads.items():
        # atol: the step sums the batch in its own order (Adam would be off by ~lr = 0.1)
        torch.testing.assert_close(after[name], before[name] - 0.1 * g, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_adam_eps_sets_where_a_step_turns_proportional_to_the_gradient(eps: float) -> None:
    """AdamW's first step is −lr g / (|g| + ε) per coordinate (bias-corrected m̂ = g,
    v̂ = g²): about lr whatever the gradient's size at the default ε, and lr g / ε, in
    proportion to it, where |g| ≪ ε (train.adam_eps)."""
    import torch

    grads, before, after = _one_step(TrainConfig(lr=0.01, adam_eps=eps))
    g = torch.cat([t.flatten() for t in grads.values()])
    step = torch.cat([(after[n] - before[n]).flatten() for n in grads])
    torch.testing.assert_close(step, -0.01 * g / (g.abs() + eps), rtol=1e-3, atol=1e-7)
    if eps == 1e-8:  # sign-like: every coordinate with a gradient moves by about lr
        assert torch.all(step[g.abs() > 1e-6].abs() > 0.009)
    else:  # the small gradients move about 100 times less than lr, or less
        small = (g.abs() > 0) & (g.abs() < eps / 100)
        assert small.sum() > 100 and torch.all(step[small].abs() < 0.01 / 100)


def test_causal_lm_reports_perplexity() -> None:
    mc = ModelConfig(name="tiny-gpt2", task="causal_lm", max_length=48)
    ds = load_dataset(DataConfig(synthetic_samples=60), "causal_lm", 0)
    tok = load_tokenizer(mc.name)
    data = encode(ds.test, tok, mc.max_length)
    metrics = evaluate(
        build_peft_model(mc, LoraConfig(r=4), 1), data, 8, tok.pad_token_id, "causal_lm"
    )
    assert set(metrics) == {"loss", "perplexity"}
    assert np.isclose(metrics["perplexity"], np.exp(metrics["loss"]))
    assert metrics["loss"] > np.log(100)  # an untrained model is near uniform over 30k tokens


def test_logit_adjustment_keeps_a_skewed_client_off_its_prior() -> None:
    """On a 90/10 client the plain loss pushes the head bias to the majority class; the
    logit-adjusted loss absorbs the prior, so the learned bias gap is much smaller."""
    mc = ModelConfig(name="tiny-bert", max_length=32)
    ds = load_dataset(DataConfig(synthetic_samples=400, synthetic_classes=2), "classification", 0)
    rows = [r for r in ds.train if r["label"] == 0][:180] + [
        r for r in ds.train if r["label"] == 1
    ][:20]
    tok = load_tokenizer(mc.name)
    data = encode(rows, tok, mc.max_length)
    gaps = {}
    for tau in (0.0, 1.0):
        model = build_peft_model(mc, LoraConfig(r=4), 2, init_seed=0)
        start = adapter_state(model)
        cfg = TrainConfig(local_steps=20, batch_size=16, lr=5e-3, logit_adjustment=tau)
        train_local(model, data, cfg, tok.pad_token_id, "classification", 0)
        bias_key = next(k for k in start if "classifier" in k and k.endswith("bias"))
        moved = adapter_state(model)[bias_key] - start[bias_key]
        gaps[tau] = float(moved[0] - moved[1])
    assert gaps[0.0] > 0.05
    assert gaps[1.0] < 0.5 * gaps[0.0]


def _prose(n_chars: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = "the federated adapter, learns (slowly) from 42 clients' un-shuffled tokens".split()
    text = " ".join(rng.choice(words, size=n_chars // 6 + 1))
    return text[:n_chars]


def test_encode_reads_a_bounded_head_of_a_huge_row_with_the_same_ids() -> None:
    from fedpeft.train import text_head

    # MiniLM's WordPiece (tiny-gpt2 borrows it) and SmolLM2's byte-level BPE (tiny-llama)
    for name, task in (("minilm", "classification"), ("tiny-llama", "causal_lm")):
        tok = load_tokenizer(name)
        texts = [
            *(r["text"] for r in load_dataset(DataConfig(synthetic_samples=50), task, 0).train),
            _prose(50_000, 0),  # cut: its head has more than max_length tokens
            " \n\t " * 5_000 + _prose(5_000, 1),  # a whitespace run of 20k characters first
            "x" * 20_000 + " " + _prose(5_000, 2),  # a 20k-character word is one [UNK]
            "word " * 3 + "y" * 30_000,  # a long row of few tokens, all of which count
            "  ".join(_prose(20_000, 3).split(" ")),  # double spaces
        ]
        today = tok(texts, truncation=True, max_length=64)["input_ids"]
        assert encode([{"text": t} for t in texts], tok, 64).input_ids == today
    huge = _prose(3_000_000, 4)  # finishes in milliseconds, not seconds
    head = text_head(huge, 8 * 64)
    assert 8 * 64 <= len(head) < 8 * 64 + 20 and huge.startswith(head)
    assert (
        encode([{"text": huge}], tok, 64).input_ids
        == tok([head], truncation=True, max_length=64)["input_ids"]
    )


def test_encode_logs_progress(caplog) -> None:  # type: ignore[no-untyped-def]
    tok = load_tokenizer("minilm")
    rows = [{"text": f"row {i}", "label": 0} for i in range(2_500)]
    with caplog.at_level("INFO", logger="fedpeft"):
        encode(rows, tok, 16, progress_s=0.0)
    assert "Tokenized 1000 of 2500 rows" in caplog.text
    assert "Tokenized 2500 of 2500 rows" in caplog.text
