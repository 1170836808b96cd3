"""Differential privacy: Opacus DP-SGD on peft adapters, accounting against Opacus,
clipping and noise of whole updates, and DP together with compression."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from fedpeft.compression.codec import dense
from fedpeft.compression.compeft import compress
from fedpeft.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
from fedpeft.data import load_dataset
from fedpeft.models import adapter_state, build_peft_model, load_tokenizer
from fedpeft.privacy import accounting
from fedpeft.privacy.accounting import Entry
from fedpeft.privacy.dpsgd import train_local_dp
from fedpeft.privacy.mechanisms import clip, gaussian_noise, global_norm
from fedpeft.train import encode, evaluate


def _tiny(seed: int = 0, pooling: str = "cls"):
    mc = ModelConfig(name="tiny-bert", max_length=32, pooling=pooling)
    ds = load_dataset(DataConfig(synthetic_samples=300, synthetic_classes=2), "classification", 0)
    tok = load_tokenizer(mc.name)
    return build_peft_model(mc, LoraConfig(r=4), ds.num_labels), encode(ds.train, tok, 32), tok


def _hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize(
    ("optimizer", "lr", "momentum", "pooling", "clip_norm"),
    [
        ("adamw", 5e-3, 0.0, "cls", 1.0),
        ("sgd", 0.5, 0.9, "cls", 1.0),
        # the random tiny-bert's mean-pooled head: at C = 1 the clipped mean gradient
        # raises its training loss even without noise (0.698 -> 0.807); at C = 3 it falls
        ("adamw", 5e-3, 0.0, "mean", 3.0),
    ],
)
def test_dpsgd_trains_the_adapters_and_records_every_step(
    optimizer: str, lr: float, momentum: float, pooling: str, clip_norm: float
) -> None:
    """The known silent failure of Opacus + peft: hooks on no module, nothing changes.
    Under model.pooling: mean the pooler's own pre-hook stays through Opacus's cleanup."""
    model, data, tok = _tiny(pooling=pooling)
    before = adapter_state(model)
    hooks_before = _hook_count(model)
    loss0 = evaluate(model, data, 64, tok.pad_token_id, "classification")["loss"]
    train = TrainConfig(
        local_steps=40, batch_size=32, lr=lr, optimizer=optimizer, momentum=momentum
    )
    result, history = train_local_dp(
        model, data, train, noise_multiplier=0.5, clip_norm=clip_norm,
        pad_id=tok.pad_token_id, task="classification", seed=0, history=[],
    )  # fmt: skip
    after = adapter_state(model)
    for part in ("lora_A", "lora_B", "classifier"):
        assert any(not np.array_equal(before[k], after[k]) for k in before if part in k), part
    assert evaluate(model, data, 64, tok.pad_token_id, "classification")["loss"] < loss0
    q = 1 / math.ceil(len(data) / 32)
    assert history == [Entry(0.5, q, 40)] and result.steps == 40
    # the cached model is left without Opacus hooks or per-sample gradients
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters()
    )
    assert _hook_count(model) == hooks_before
    # a second round composes onto the first history
    _, history = train_local_dp(
        model, data, TrainConfig(local_steps=10, batch_size=32, lr=5e-3), noise_multiplier=0.5,
        clip_norm=1.0, pad_id=tok.pad_token_id, task="classification", seed=1, history=history,
    )  # fmt: skip
    assert history == [Entry(0.5, q, 50)]


def _dp_step_size(adam_eps: float) -> float:
    """The largest coordinate move of one noiseless DP-AdamW step from the same start."""
    model, data, tok = _tiny()
    before = adapter_state(model)
    train_local_dp(
        model, data, TrainConfig(local_steps=1, batch_size=32, lr=0.01, adam_eps=adam_eps),
        noise_multiplier=0.0, clip_norm=1.0, pad_id=tok.pad_token_id, task="classification",
        seed=0, history=[],
    )  # fmt: skip
    after = adapter_state(model)
    return max(float(np.abs(after[k] - before[k]).max()) for k in before)


def test_dpsgd_steps_with_the_configured_adam_eps() -> None:
    """train.adam_eps reaches Opacus's optimizer: AdamW's first step is lr g / (|g| + ε),
    about lr at ε = 1e-8 and at most lr · C / ε at ε = 10 (a clipped mean gradient has
    norm at most C = 1)."""
    assert _dp_step_size(1e-8) > 0.009
    assert _dp_step_size(10.0) < 0.01 / 10


def test_make_private_needs_the_model_in_training_mode() -> None:
    """Pins the trap: from_pretrained leaves the model in eval mode; Opacus 1.6 refuses
    it (older releases trained the head silently without per-sample gradients), which is
    why train_local_dp calls model.train() first."""
    import torch
    from opacus import PrivacyEngine
    from opacus.validators.errors import UnsupportedModuleError
    from torch.utils.data import DataLoader

    model, _, _ = _tiny()
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(UnsupportedModuleError, match="training mode"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(params, lr=0.1),
            data_loader=DataLoader([(torch.tensor(0),)] * 8, batch_size=4),
            noise_multiplier=1.0, max_grad_norm=1.0, wrap_model=False,
        )  # fmt: skip


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_equals_opacus_accountant(kind: str) -> None:
    history = [Entry(1.1, 0.01, 500), Entry(0.8, 0.02, 300)]
    ours = accounting.epsilon(history, 1e-5, kind)
    theirs = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for _ in range(500):
        theirs.step(noise_multiplier=1.1, sample_rate=0.01)
    for _ in range(300):
        theirs.step(noise_multiplier=0.8, sample_rate=0.02)
    assert ours == pytest.approx(theirs.get_epsilon(delta=1e-5), rel=1e-9)
    # the node state's plain lists give back the same history
    assert accounting.from_lists(**accounting.to_lists(history)) == history  # type: ignore[arg-type]


def test_the_noise_search_tops_out_where_opacus_does() -> None:
    assert accounting.MAX_NOISE == MAX_SIGMA  # a copy, so the client needs no Opacus import


def test_noise_for_a_budget_spends_that_budget() -> None:
    z = accounting.noise_for_budget(3.0, 1e-5, 0.05, 200, "rdp")
    assert z == get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.05, steps=200
    )
    assert 2.95 < accounting.epsilon([Entry(z, 0.05, 200)], 1e-5) <= 3.0
    # and the affordable rounds of a fixed z stop right before the budget
    n = accounting.affordable_steps(1.0, 0.1, 2.0, 1e-5, 1000, "rdp")
    assert accounting.epsilon([Entry(1.0, 0.1, n)], 1e-5) <= 2.0
    assert accounting.epsilon([Entry(1.0, 0.1, n + 1)], 1e-5) > 2.0


def test_clipping_never_exceeds_the_norm() -> None:
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 1e3):
        update = {"a": rng.standard_normal((8, 16)).astype(np.float32) * scale,
                  "b": rng.standard_normal((16, 8)).astype(np.float32) * scale}  # fmt: skip
        clipped, norm = clip(update, 0.5)
        assert global_norm(clipped) <= 0.5
        if norm <= 0.5:
            assert clipped is update
        else:  # direction kept
            ratio = clipped["a"] / update["a"]
            np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)


def test_gaussian_noise_has_the_configured_std() -> None:
    rng = np.random.default_rng(7)
    zero = {"w": np.zeros((400, 250), np.float32)}
    noisy = gaussian_noise(zero, 0.3, rng)["w"].astype(np.float64)
    n = noisy.size  # 100k draws: the sample std is within 1% of 0.3 with overwhelming odds
    assert abs(noisy.mean()) < 4 * 0.3 / math.sqrt(n)
    assert noisy.std() == pytest.approx(0.3, rel=0.01)


def test_a_compressed_update_over_the_clip_norm_is_brought_back_to_it() -> None:
    """clip → compress → re-clip: one magnitude per tensor lengthens a clipped update."""
    from fedpeft.client import reclip_sent
    from fedpeft.wire import TrainRes

    rng = np.random.default_rng(3)
    # a heavy-tailed update: the mean |top-k| scale makes the ternary vector longer
    update = {"w": (rng.standard_t(1.5, size=(64, 64))).astype(np.float32)}
    clipped, _ = clip(update, 1.0)
    sent, residual = compress(clipped, {}, density=0.3, scale="compeft", alpha=3.0)
    res = TrainRes(
        update=dense(sent), num_examples=1, train_loss=0.0, train_seconds=0.0, compressed=sent
    )
    assert global_norm(res.update) > 1.0  # the case this guards against
    res2, residual2 = reclip_sent(res, residual, 1.0)
    assert global_norm(res2.update) <= 1.0
    assert global_norm(dense(res2.compressed)) <= 1.0
    # error feedback keeps exactly what was not sent
    np.testing.assert_allclose(res2.update["w"] + residual2["w"], clipped["w"], atol=1e-5)


# --------------------------------------------------------------------------- bounds

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _bounded(code: str, seconds: float = 90.0) -> str:
    """Run ``code`` in a fresh interpreter and return its stdout; a search that spins
    fails the test after ``seconds`` instead of hanging the suite."""
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", code],
            capture_output=True, text=True, timeout=seconds, cwd=ROOT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {seconds:.0f} s: {code}")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _config_error(overrides: list[str]) -> str:
    """The ConfigError of ``load_config(quickstart, overrides)``, in a bounded child."""
    return _bounded(
        "from fedpeft.config import ConfigError, load_config\n"
        "try:\n"
        f"    load_config('configs/quickstart.yaml', {overrides!r})\n"
        "except ConfigError as err:\n"
        "    print(err)\n"
        "else:\n"
        "    print('accepted')\n"
    )


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        # spun at 100% CPU in Opacus's bisection, which cannot get within 0.01 of 1e15
        (["privacy.mode=user", "privacy.epsilon=1e15"], "'privacy.epsilon' should be in (0, 100]"),
        (["privacy.mode=record", "privacy.epsilon=101"], "'privacy.epsilon' should be in (0, 100]"),
        (["privacy.mode=user", "privacy.epsilon=8", "privacy.delta=0.5"], "'privacy.delta' should be in (0, 0.1]"),
        # the RDP series behind one round's ε never ends at z = 1e-200; z = 1e200 overflows
        (["privacy.mode=user", "privacy.epsilon=8", "privacy.noise_multiplier=1e-200"], "'privacy.noise_multiplier' should be in [0.1, 1e6]"),
        (["privacy.mode=user", "privacy.epsilon=8", "privacy.noise_multiplier=1e200"], "'privacy.noise_multiplier' should be in [0.1, 1e6]"),
        # the PRV accountant's cost grows with ε and the steps: minutes per search beyond
        # ε = 20 or 10^4 steps; below δ = 1e-16 it fails, which read as "ε too small"
        (
            ["privacy.mode=user", "privacy.epsilon=50", "privacy.accountant=prv"],
            "'privacy.accountant: prv' takes minutes to search a noise multiplier above ε = 20",
        ),
        (
            ["privacy.mode=user", "privacy.epsilon=8", "privacy.accountant=prv", "privacy.delta=1e-20"],
            "'privacy.accountant: prv' cannot compute ε below δ = 1e-10",
        ),
        (
            ["privacy.mode=record", "privacy.epsilon=8", "privacy.accountant=prv", "federation.rounds=10000"],
            "'privacy.accountant: prv' takes minutes per ε beyond 10000 accounted steps",
        ),
    ],
)  # fmt: skip
def test_absurd_budgets_end_in_one_sentence(overrides: list[str], fragment: str) -> None:
    message = _config_error(overrides)
    assert fragment in message
    assert "\n" not in message


def test_a_budget_at_the_edges_of_the_range_is_searched_quickly() -> None:
    """ε = 100 (the largest accepted) and a budget too small for one round both end."""
    assert _config_error(["privacy.mode=user", "privacy.epsilon=100"]) == "accepted"
    message = _config_error(["privacy.mode=user", "privacy.epsilon=1e-12"])
    assert "'privacy.epsilon' 1e-12 is too small for 5 rounds" in message


def test_the_noise_search_is_bounded_for_any_budget() -> None:
    """Called directly (no config in between), an ε no z can spend ends at the smallest
    z fedpeft searches, which spends less than that ε; before, the bisection spun."""
    out = _bounded(
        "from fedpeft.privacy import accounting as a\n"
        "z = a.noise_for_budget(1e15, 1e-5, 0.4, 1, 'rdp')\n"
        "print(z, a.epsilon([a.Entry(z, 0.4, 1)], 1e-5, 'rdp'))\n"
    )
    z, spent = map(float, out.split())
    assert z == accounting.MIN_NOISE and 100 < spent < 1e15
    # PRV's mesh grows with ε: past what config.py accepts it refuses instead of taking
    # minutes (or all memory) per probe
    with pytest.raises(ValueError, match="The PRV accountant takes minutes"):
        accounting.noise_for_budget(1e15, 1e-5, 0.4, 1, "prv")
    with pytest.raises(ValueError, match="The PRV accountant takes minutes"):
        accounting.affordable_steps(1.0, 0.1, 2.0, 1e-5, 10**5, "prv")


def test_affordable_steps_costs_the_log_of_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """federation.rounds = 10**30 used to cost 100 evaluations of ε (40 s at 0.4 s each)
    for a budget that affords a handful of rounds."""
    calls: list[int] = []
    real = accounting.epsilon

    def counted(history: list[Entry], delta: float, kind: accounting.AccountantName = "rdp"):
        calls.append(history[0].steps)
        return real(history, delta, kind)

    monkeypatch.setattr(accounting, "epsilon", counted)
    n = accounting.affordable_steps(2.0, 0.1, 3.0, 1e-5, 10**30, "rdp")
    assert real([Entry(2.0, 0.1, n)], 1e-5) <= 3.0 < real([Entry(2.0, 0.1, n + 1)], 1e-5)
    assert n == 134 and len(calls) <= 2 * math.log2(n) + 3
    calls.clear()  # a budget that affords every round: one evaluation
    assert accounting.affordable_steps(5.0, 0.1, 2.0, 1e-5, 50, "rdp") == 50
    assert len(calls) == 1
