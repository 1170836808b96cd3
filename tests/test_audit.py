"""Gradient-inversion audit on a tiny BERT: each attack recovers what the literature says
it recovers without a defense, and falls to chance under enough local DP noise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedpeft.audit import Public, Secret, ServerView, build_attack, observe
from fedpeft.audit.scoring import label_accuracy, score, sentence_scores
from fedpeft.audit.threat import initial_adapters, warmed_adapters
from fedpeft.cli import main
from fedpeft.config import Config, config_from_dict
from fedpeft.data import synthetic_rows
from fedpeft.models import load_tokenizer

NUM_LABELS = 2
SENTENCES = (
    "the movie was great fun",
    "a dull and boring film",
    "i hated every minute",
    "what a lovely story",
    "the plot makes no sense",
    "brilliant acting all round",
)
NO_DEFENSE: dict[str, Any] = {}
LOCAL_DP = {"mode": "local", "noise_multiplier": 5.0, "clip_norm": 0.01, "noise_seed": 0}


def _cfg(targets: list[str], privacy: dict[str, Any], lr: float = 0.1) -> Config:
    return config_from_dict(
        {
            "model": {"name": "tiny-bert", "dropout": 0.0, "max_length": 16},
            "lora": {"r": 8, "target_modules": targets},
            "data": {"source": "synthetic"},
            "train": {"optimizer": "sgd", "lr": lr, "local_steps": 1},
            "privacy": privacy,
        }
    )


def _observe(
    cfg: Config, rows: list[dict[str, Any]], warm: bool, trial: int = 0
) -> tuple[ServerView, Secret]:
    public = synthetic_rows(64, NUM_LABELS, seed=1)
    sent = (
        warmed_adapters(cfg, cfg.lora, NUM_LABELS, public, steps=20)
        if warm
        else initial_adapters(cfg, cfg.lora, NUM_LABELS)
    )
    return observe(cfg, rows, sent, cfg.lora, NUM_LABELS, server_round=trial + 1)


def _run(name: str, view: ServerView, secret: Secret) -> dict[str, Any]:
    attack = build_attack(name)
    assert attack.unavailable(view) is None
    return score(attack.run(view, Public(SENTENCES)), secret, view)


@pytest.mark.parametrize(("privacy", "low", "high"), [(NO_DEFENSE, 1.0, 1.0), (LOCAL_DP, 0.2, 0.8)])
def test_label_of_a_single_example_leaks_from_the_head_bias(
    privacy: dict[str, Any], low: float, high: float
) -> None:
    cfg = _cfg(["query", "value"], privacy)
    hits = []
    for i in range(24):
        row = {"text": SENTENCES[i % len(SENTENCES)], "label": (i // 3) % NUM_LABELS}
        view, secret = _observe(cfg, [row], warm=False, trial=i)  # fresh noise per trial
        hits.append(_run("labels", view, secret)["label_accuracy"])
    assert low <= float(np.mean(hits)) <= high  # no defense: every trial; DP: chance (1/2)


@pytest.mark.parametrize(("privacy", "exact"), [(NO_DEFENSE, True), (LOCAL_DP, False)])
def test_head_input_of_a_single_example_is_recovered_and_retrieved(
    privacy: dict[str, Any], exact: bool
) -> None:
    cfg = _cfg(["query", "value"], privacy)
    view, secret = _observe(cfg, [{"text": SENTENCES[2], "label": 1}], warm=False)
    scores = _run("head_input", view, secret)
    if exact:
        assert scores["head_input_cosine"] >= 0.99 and scores["exact_matches"] == 1.0
    else:
        assert abs(scores["head_input_cosine"]) < 0.5


@pytest.mark.parametrize(("privacy", "exact"), [(NO_DEFENSE, True), (LOCAL_DP, False)])
def test_embedding_lora_reveals_the_token_set(privacy: dict[str, Any], exact: bool) -> None:
    cfg = _cfg(["query", "value", "word_embeddings"], privacy)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(SENTENCES[:4])]
    view, secret = _observe(cfg, rows, warm=False)
    scores = _run("token_set", view, secret)
    if exact:
        assert scores["token_precision"] == 1.0 and scores["token_recall"] == 1.0
    else:  # every column is noised: the guess is the vocabulary, precision |T| / V
        assert scores["token_precision"] < 0.01


@pytest.mark.parametrize(("privacy", "exact"), [(NO_DEFENSE, True), (LOCAL_DP, False)])
def test_span_test_on_first_layer_lora_recovers_a_short_sentence(
    privacy: dict[str, Any], exact: bool
) -> None:
    """4 (token, position) pairs ≤ 16 = rank of the stacked q, v factors: exact.

    Short, because on this random tiny model the gradient of a token far from [CLS] is
    ~1e-4 of [CLS]'s, and Δ = fl(A − η g) − A keeps no component below float32 rounding
    of A (about 1e-7 here): longer sentences lose their weakest tokens."""
    cfg = _cfg(["query", "value"], privacy, lr=10.0)
    view, secret = _observe(cfg, [{"text": "great fun", "label": 1}], warm=True)
    scores = _run("span", view, secret)
    if exact:
        assert scores["token_precision"] >= 0.9 and scores["token_recall"] >= 0.9
        assert scores["exact_matches"] == 1.0
    else:
        assert scores["token_recall"] <= 0.2


def test_span_test_cannot_be_exact_when_the_batch_outnumbers_the_rank() -> None:
    cfg = _cfg(["query", "value"], NO_DEFENSE, lr=10.0)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(SENTENCES)]  # ~36 pairs > 16
    view, secret = _observe(cfg, rows, warm=True)
    assert _run("span", view, secret)["token_recall"] < 0.9


def test_span_test_on_a_rotary_llama_recovers_the_vocabulary_tokens() -> None:
    """Llama adds positions after the projections (RoPE), so layer-0 inputs are
    RMSNorm(E[v]) at every position: the test finds which tokens, not where. The last
    token of a causal-LM row predicts nothing and reaches no earlier position, so its
    input gets no gradient and stays out of the span."""
    cfg = config_from_dict(
        {
            "model": {"name": "tiny-llama", "task": "causal_lm", "max_length": 16},
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
            "data": {"source": "synthetic"},
            "train": {"optimizer": "sgd", "lr": 10.0, "local_steps": 1},
        }
    )
    view, _ = _observe(cfg, [{"text": "the movie was great fun", "label": 1}], warm=True)
    guess = build_attack("span").run(view, Public(candidates=()))
    tok = load_tokenizer("tiny-llama")
    ids = tok("the movie was great fun")["input_ids"]
    assert set(ids[:-1]) <= guess.tokens <= set(ids)
    assert guess.texts is None  # no positions, so no sentence


def test_attacks_say_what_they_need() -> None:
    cfg = _cfg(["value"], NO_DEFENSE)
    cfg_no_head = config_from_dict({**cfg.to_dict(), "lora": {"r": 2, "train_head": False}})
    view, _ = _observe(cfg_no_head, [{"text": SENTENCES[0], "label": 0}], warm=False)
    assert build_attack("labels").unavailable(view) == "no task-head bias in the update"
    assert build_attack("token_set").unavailable(view) == "no embedding LoRA in the update"
    with pytest.raises(ValueError, match="Unknown attack 'dlg'"):
        build_attack("dlg")


def test_scores_match_by_hand() -> None:
    assert label_accuracy((0, 0, 1), (0, 1, 1)) == pytest.approx(2 / 3)
    scores = sentence_scores(("a dull film", "the movie was great fun"), SENTENCES[:2])
    assert scores["exact_matches"] == 0.5  # matched one to one, the best way round
    assert scores["rouge1"] == pytest.approx((1.0 + 2 * 3 / 8) / 2)


def _audit_yaml(tmp_path: Path, audit: dict[str, Any]) -> Path:
    raw = {
        "model": {"name": "tiny-bert", "dropout": 0.0, "max_length": 16},
        "lora": {"r": 8, "target_modules": ["query", "value", "word_embeddings"]},
        "data": {"source": "synthetic", "synthetic_samples": 60},
        "train": {"optimizer": "sgd", "lr": 0.1, "local_steps": 2},
        "audit": audit,
    }
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_audit_command_writes_the_table_json_and_plot(tmp_path: Path) -> None:
    audit = {
        "attacks": ["labels", "token_set", "span"],
        "batch_sizes": [1, 2],
        "settings": ["fedsgd", "fedavg"],
        "trials": 2,
        "candidates": 5,
        "warmup_steps": 0,
        "defenses": {"none": {}, "ldp": {"privacy": LOCAL_DP}},
    }
    out = tmp_path / "out"
    assert main(["audit", str(_audit_yaml(tmp_path, audit)), "--out", str(out)]) == 0
    summary = json.loads((out / "audit.json").read_text())
    assert len(summary["trials"]) == 2 * 2 * 2 * 2 * 3  # defenses × settings × B × trials × attacks
    cells = {
        (c["defense"], c["setting"], c["batch_size"], c["attack"]): c for c in summary["cells"]
    }
    assert cells[("none", "fedsgd", 1, "labels")]["scores"]["label_accuracy"] == 1.0
    assert cells[("none", "fedavg", 2, "token_set")]["scores"]["token_precision"] == 1.0
    assert cells[("ldp", "fedsgd", 2, "token_set")]["scores"]["token_precision"] < 0.01
    # round 1 (no warm-up): B = 0, so the first-layer ΔA is zero and the span test finds nothing
    assert cells[("none", "fedsgd", 1, "span")]["scores"]["token_recall"] == 0.0
    report = (out / "audit.md").read_text()
    assert "honest-but-curious server" in report and "| ldp | fedavg | 2 |" in report
    assert (out / "plots" / "leakage.png").stat().st_size > 0


def test_the_audit_refuses_a_method_it_cannot_attack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _audit_yaml(tmp_path, {"warmup_steps": 0})
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "peft": {"method": "sparse"}}))
    assert main(["audit", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "does not apply to 'peft.method: sparse' yet" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("audit", "message"),
    [
        ({"attacks": ["dlg"]}, "'audit.attacks' names unknown attack 'dlg'"),
        ({"defenses": {"loud": {"privacy": {"mode": "loud"}}}}, "Audit defense 'loud': "),
        ({"settings": ["fedprox"]}, "'audit.settings' should list some of fedsgd, fedavg"),
        ({"batch_sizes": [40], "trials": 3}, "The audit needs 120 training examples"),
    ],
)
def test_audit_mistakes_end_in_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], audit: dict[str, Any], message: str
) -> None:
    path = _audit_yaml(tmp_path, {"warmup_steps": 0, **audit})
    assert main(["audit", str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("privacy", "steps", "matched"),
    [(NO_DEFENSE, 1, True), (NO_DEFENSE, 3, True), (LOCAL_DP, 1, False)],
    ids=["fedsgd", "fedavg-3-steps", "local-dp"],
)
def test_gradient_matching_fits_a_real_update_but_not_noise(
    privacy: dict[str, Any], steps: int, matched: bool
) -> None:
    """TAG/LAMP's objective, with the client's SGD steps simulated: dummy inputs
    reproduce the observed update's direction (on this random tiny model that does not
    pin the tokens down), while a noised update has no input that explains it."""
    from fedpeft.audit.optimization import GradientMatching

    cfg = _cfg(["query", "value"], privacy)
    cfg = config_from_dict(
        {**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "local_steps": steps}}
    )
    view, _ = _observe(cfg, [{"text": SENTENCES[0], "label": 1}], warm=True)
    result = GradientMatching(iterations=60, length=7).match(view, Public(SENTENCES))
    assert result.ids.shape == (1, 7)
    if matched:
        assert result.final < 0.15 * result.first
    else:
        assert result.final > 0.5


def test_projected_span_test_on_delta_b_works_in_round_one() -> None:
    """Round 1: B = 0, so ΔA = 0 and the ΔA test sees nothing; ΔB's rows span the
    batch's inputs through the known A while they number fewer than r (4 < 8)."""
    cfg = _cfg(["query", "value"], NO_DEFENSE)
    view, secret = _observe(cfg, [{"text": "great fun", "label": 1}], warm=False)
    assert _run("span", view, secret)["token_recall"] == 0.0
    scores = _run("span_b", view, secret)
    assert scores["token_precision"] == 1.0 and scores["token_recall"] == 1.0
    noised, _ = _observe(
        _cfg(["query", "value"], LOCAL_DP), [{"text": "great fun", "label": 1}], warm=False
    )
    assert build_attack("span_b").unavailable(noised) == (
        "ΔB spans all of R^r (the batch has at least r token positions)"
    )
