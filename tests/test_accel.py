"""Devices and precision: every decision and refusal on a CPU with the machine's offer
passed in; the real CUDA path where there is a GPU; activation checkpointing on the tiny
models (same gradients, fewer saved activations)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from fedpeft import accel
from fedpeft.config import Config, ConfigError, LoraConfig, ModelConfig, config_from_dict
from fedpeft.memory import measure_step_memory
from fedpeft.models import build_peft_model

CPU, MPS, CUDA, CUDA0 = (torch.device(d) for d in ("cpu", "mps", "cuda", "cuda:0"))
TINY_LLAMA_4BIT = ModelConfig(name="tiny-llama", task="causal_lm", load_in_4bit=True)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bitsandbytes() -> bool:
    return torch.cuda.is_available() and accel._bitsandbytes_imports()


# --------------------------------------------------------------------------- device


@pytest.mark.parametrize(
    ("choice", "cuda", "mps", "expected"),
    [
        ("auto", 0, False, "cpu"),
        ("auto", 0, True, "mps"),
        ("auto", 1, True, "cuda"),  # CUDA before MPS
        ("auto", True, False, "cuda"),  # a bool counts as one GPU
        ("cpu", 2, True, "cpu"),  # asked for, whatever else there is
        ("cuda", 1, False, "cuda"),
        ("cuda:1", 2, False, "cuda:1"),
        ("mps", 0, True, "mps"),
    ],
)
def test_device_resolution(choice: str, cuda: int, mps: bool, expected: str) -> None:
    assert accel.resolve_device(choice, cuda=cuda, mps=mps) == torch.device(expected)


@pytest.mark.parametrize(
    ("choice", "cuda", "mps", "message"),
    [
        ("cuda", 0, True, "'train.device: cuda' needs a CUDA GPU, and torch sees none."),
        ("cuda:0", False, False, "'train.device: cuda:0' needs a CUDA GPU, and torch sees none."),
        ("cuda:1", 1, False, "'train.device: cuda:1' names a GPU torch does not see (it sees 1)."),
        ("mps", 1, False, "'train.device: mps' needs Apple's MPS, which is unavailable."),
    ],
)
def test_an_absent_device_is_refused(choice: str, cuda: int, mps: bool, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        accel.resolve_device(choice, cuda=cuda, mps=mps)
    assert str(err.value) == message


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("device", "precision", "bf16", "expected"),
    [
        (CUDA, "auto", True, torch.bfloat16),
        (CUDA, "auto", False, None),  # no fp16 unasked: it needs loss scaling
        (CUDA, "fp32", True, None),
        (CUDA, "bf16", True, torch.bfloat16),
        (CUDA0, "fp16", True, torch.float16),
        (CUDA, "fp16", False, torch.float16),
        (CPU, "auto", True, None),  # CPU bf16 only when asked for
        (CPU, "fp32", None, None),
        (CPU, "bf16", None, torch.bfloat16),
        (MPS, "auto", True, None),
        (MPS, "fp32", None, None),
    ],
)
def test_autocast_dtype(
    device: torch.device, precision: str, bf16: bool | None, expected: torch.dtype | None
) -> None:
    assert accel.autocast_dtype(device, precision, bf16=bf16) is expected


@pytest.mark.parametrize(
    ("device", "precision", "bf16", "message"),
    [
        (
            CUDA,
            "bf16",
            False,
            "'train.precision: bf16' needs a GPU with native bfloat16 (compute capability "
            "8.0 or later); use fp16 or fp32 on this one.",
        ),
        (
            CPU,
            "fp16",
            None,
            "'train.precision: fp16' needs a CUDA GPU, and training is on cpu; use auto or fp32.",
        ),
        (MPS, "fp16", None, "'train.precision: fp16' needs a CUDA GPU, and training is on mps"),
        (MPS, "bf16", None, "'train.precision: bf16' needs a CUDA GPU, and training is on mps"),
    ],
)
def test_an_unsupported_precision_is_refused(
    device: torch.device, precision: str, bf16: bool | None, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        accel.autocast_dtype(device, precision, bf16=bf16)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("dtype", "expected"), [(None, torch.float32), (torch.bfloat16, torch.bfloat16)]
)
def test_autocast_runs_matmuls_in_its_dtype(dtype: torch.dtype | None, expected: Any) -> None:
    layer = torch.nn.Linear(4, 3)
    with accel.autocast(CPU, dtype):
        out = layer(torch.ones(2, 4))
    assert out.dtype == expected and layer.weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("dtype", "enabled"), [(None, False), (torch.bfloat16, False), (torch.float16, True)]
)
def test_loss_scaling_only_for_fp16(dtype: torch.dtype | None, enabled: bool) -> None:
    assert accel.grad_scaler(CPU, dtype).is_enabled() is enabled


# --------------------------------------------------------------------------- 4-bit


def test_4bit_config_is_qlora() -> None:
    kwargs = accel.quantization_kwargs(True, torch.device("cuda:1"), bitsandbytes=True, bf16=True)
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["device_map"] == {"": 1}
    without_bf16 = accel.quantization_kwargs(True, CUDA0, bitsandbytes=True, bf16=False)
    assert without_bf16["quantization_config"].bnb_4bit_compute_dtype == torch.float16


def test_no_4bit_asks_for_nothing() -> None:
    assert accel.quantization_kwargs(False, CPU, bitsandbytes=False) == {}


@pytest.mark.parametrize(
    ("device", "bitsandbytes", "message"),
    [
        (
            CPU,
            True,
            "'model.load_in_4bit' needs training on a CUDA GPU (bitsandbytes' 4-bit kernels), "
            "not on cpu; set it to false.",
        ),
        (MPS, True, "'model.load_in_4bit' needs training on a CUDA GPU"),
        (
            CUDA0,
            False,
            "'model.load_in_4bit' needs bitsandbytes, which does not import here "
            "(`pip install bitsandbytes`); set it to false.",
        ),
    ],
)
def test_4bit_without_cuda_or_bitsandbytes_is_refused(
    device: torch.device, bitsandbytes: bool, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        accel.quantization_kwargs(True, device, bitsandbytes=bitsandbytes, bf16=True)
    assert str(err.value).startswith(message)


def test_bitsandbytes_that_does_not_import_counts_as_absent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    assert accel._bitsandbytes_imports() is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_a_4bit_model_is_refused_before_loading_without_cuda() -> None:
    with pytest.raises(ConfigError) as err:
        build_peft_model(TINY_LLAMA_4BIT, LoraConfig(), num_labels=2)
    assert str(err.value).startswith("'model.load_in_4bit' needs training on a CUDA GPU")


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"device": "gpu"}}, "'train.device' should be auto, cpu, cuda, cuda:N or mps"),
        ({"train": {"device": "cuda:"}}, "'train.device' should be auto, cpu, cuda, cuda:N"),
        ({"train": {"device": "CUDA"}}, "'train.device' should be auto, cpu, cuda, cuda:N"),
        ({"train": {"device": "cuda:0 "}}, "'train.device' should be auto, cpu, cuda, cuda:N"),
        ({"train": {"precision": "int8"}}, "'train.precision' should be one of ['auto', 'fp32'"),
        ({"train": {"gradient_checkpointing": "yes"}}, "'train.gradient_checkpointing' should"),
        ({"model": {"load_in_4bit": 1}}, "'model.load_in_4bit' should be bool"),
        ({"simulation": {"client_gpus": -0.5}}, "'simulation.client_gpus' should be non-negative."),
        ({"simulation": {"client_gpus": "half"}}, "'simulation.client_gpus' should be float"),
        (
            {
                "train": {"gradient_checkpointing": True},
                "privacy": {"mode": "record", "noise_multiplier": 1.0},
            },
            "'privacy.mode: record' needs 'train.gradient_checkpointing: false'",
        ),
        (
            {"model": {"load_in_4bit": True}, "federation": {"aggregator": "flora"}},
            "'federation.aggregator: flora' merges updates into the base weights",
        ),
        (
            {
                "train": {"precision": "fp16"},
                "privacy": {"mode": "record", "noise_multiplier": 1.0},
            },
            "'train.precision: fp16' scales the loss",
        ),
    ],
)
def test_device_keys_are_validated(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert str(err.value).startswith(message)


def test_device_defaults_change_nothing() -> None:
    cfg = config_from_dict({})
    assert (cfg.train.device, cfg.train.precision, cfg.train.gradient_checkpointing) == (
        "auto",
        "auto",
        False,
    )
    assert cfg.model.load_in_4bit is False and cfg.simulation.client_gpus == 0.0


def test_the_client_gpu_share_reaches_flower() -> None:
    from fedpeft.cli import backend_config

    cfg = config_from_dict({"train": {"device": "cuda:3"}, "simulation": {"client_gpus": 0.5}})
    assert backend_config(cfg)["client_resources"]["num_gpus"] == 0.5


def _cfg(train: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Config:
    return config_from_dict({"train": train or {}, **sections})


@pytest.mark.parametrize(
    ("cfg", "offer", "expected"),
    [
        (_cfg(), {"cuda": 0, "mps": False}, CPU),
        (_cfg({"precision": "bf16"}), {"cuda": 1, "bf16": True}, CUDA),
        (_cfg(model={"load_in_4bit": True}), {"cuda": 1, "bitsandbytes": True}, CUDA),
        (
            _cfg({"device": "cuda:0"}, model={"load_in_4bit": True}),
            {"cuda": 2, "bitsandbytes": True},
            CUDA0,
        ),
    ],
)
def test_check_devices_returns_the_training_device(
    cfg: Config, offer: dict[str, Any], expected: torch.device
) -> None:
    assert accel.check_devices(cfg, **offer) == expected


@pytest.mark.parametrize(
    ("cfg", "offer", "message"),
    [
        (_cfg({"device": "cuda"}), {"cuda": 0}, "'train.device: cuda' needs a CUDA GPU"),
        (_cfg({"precision": "fp16"}), {"cuda": 0, "mps": False}, "'train.precision: fp16' needs"),
        (
            _cfg({"device": "cpu"}, model={"load_in_4bit": True}),
            {"cuda": 1, "bitsandbytes": True},
            "'model.load_in_4bit' needs training on a CUDA GPU",
        ),
        (
            _cfg(model={"load_in_4bit": True}),
            {"cuda": 1, "bitsandbytes": False},
            "'model.load_in_4bit' needs bitsandbytes",
        ),
        (
            _cfg({"device": "cuda:1"}, model={"load_in_4bit": True}),
            {"cuda": 2, "bitsandbytes": True},
            "'model.load_in_4bit' loads the base on the current GPU; use 'train.device: cuda'",
        ),
    ],
)
def test_check_devices_refuses_what_the_machine_lacks(
    cfg: Config, offer: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        accel.check_devices(cfg, **{"mps": False, "bf16": True, **offer})
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("cfg", "cuda"),
    [
        (_cfg(), 0),  # no share, no GPU asked for: CPU clients
        (_cfg({"device": "cpu"}), 1),
        (_cfg(simulation={"client_gpus": 0.5}), 1),
        (_cfg(simulation={"client_gpus": 2}), 2),
        (_cfg(simulation={"client_gpus": 1, "ray_address": "10.0.0.1:6379"}), 0),  # its nodes'
    ],
)
def test_client_gpus_that_fit(cfg: Config, cuda: int) -> None:
    accel.check_client_gpus(cfg, cuda=cuda)


@pytest.mark.parametrize(
    ("cfg", "cuda", "message"),
    [
        (
            _cfg(simulation={"client_gpus": 0.5}),
            0,
            "'simulation.client_gpus' (0.5) needs a CUDA GPU, and torch sees none on this machine.",
        ),
        (
            _cfg(simulation={"client_gpus": 3}),
            2,
            "'simulation.client_gpus' (3) exceeds the 2 CUDA GPUs available.",
        ),
        (
            _cfg({"device": "cuda"}),
            1,
            "Virtual clients see no GPU with 'simulation.client_gpus: 0'",
        ),
        (
            _cfg(model={"load_in_4bit": True}, simulation={"ray_address": "auto"}),
            0,
            "Virtual clients see no GPU with 'simulation.client_gpus: 0'",
        ),
    ],
)
def test_client_gpus_that_do_not_fit(cfg: Config, cuda: int, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        accel.check_client_gpus(cfg, cuda=cuda)
    assert str(err.value).startswith(message)


# --------------------------------------------------------------------------- checkpointing


def _batch(task: str, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, vocab - 1, (4, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0  # (B, T); one padded row
    labels = ids.masked_fill(mask == 0, -100) if task == "causal_lm" else torch.tensor([0, 1] * 2)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _one_step(model_cfg: ModelConfig, checkpointing: bool) -> tuple[dict[str, int], dict[str, Any]]:
    """Saved bytes and adapter gradients of one step, from the same B ≠ 0 adapters (with
    B = 0 the A gradients are zero either way) and the same dropout draws."""
    model = build_peft_model(model_cfg, LoraConfig(r=4), 2, gradient_checkpointing=checkpointing)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    memory = measure_step_memory(model, _batch(model_cfg.task, model.config.vocab_size))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return memory, grads


def test_checkpointing_a_model_without_support_is_refused() -> None:
    class Opaque(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ConfigError) as err:
        accel.enable_gradient_checkpointing(Opaque())  # type: ignore[arg-type]
    assert str(err.value) == (
        "'train.gradient_checkpointing' is not supported by Opaque; set it to false."
    )


@pytest.mark.parametrize(
    ("model_cfg", "saved_share"),
    [
        # the (B, T, 49152) logits are nearly all tiny-llama's activations, and they are
        # kept either way: checkpointing saves under 3% of the bytes there
        (ModelConfig(name="tiny-llama", task="causal_lm", max_length=32), 0.99),
        (ModelConfig(name="tiny-bert", max_length=32), 0.3),  # dropout 0.1: same draws
    ],
    ids=["tiny-llama", "tiny-bert"],
)
def test_checkpointing_keeps_gradients_and_saves_activations(
    model_cfg: ModelConfig, saved_share: float
) -> None:
    plain_memory, plain_grads = _one_step(model_cfg, checkpointing=False)
    memory, grads = _one_step(model_cfg, checkpointing=True)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7)
    assert memory["activations"] < saved_share * plain_memory["activations"]
    assert memory["weights"] == plain_memory["weights"]


# --------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not _bitsandbytes(), reason="needs a CUDA GPU and bitsandbytes")
def test_a_4bit_tiny_llama_trains_in_bf16_on_cuda() -> None:
    import bitsandbytes as bnb

    device = accel.resolve_device("cuda")
    dtype = accel.autocast_dtype(device, "auto")
    model = build_peft_model(TINY_LLAMA_4BIT, LoraConfig(r=4), 2, gradient_checkpointing=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    batch = {k: v.to(device) for k, v in _batch("causal_lm", model.config.vocab_size).items()}
    model.train()
    with accel.autocast(device, dtype):
        loss = model(**batch).loss
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(p.dtype == torch.float32 for p in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


@needs_cuda
def test_bf16_autocast_step_on_cuda() -> None:
    device = accel.resolve_device("cuda")
    dtype = accel.autocast_dtype(device, "auto")
    model = build_peft_model(ModelConfig(name="tiny-llama", task="causal_lm"), LoraConfig(), 2)
    model.to(device).train()
    batch = {k: v.to(device) for k, v in _batch("causal_lm", model.config.vocab_size).items()}
    scaler = accel.grad_scaler(device, dtype)
    with accel.autocast(device, dtype):
        out = model(**batch)
    assert out.logits.dtype == (dtype or torch.float32)
    scaler.scale(out.loss).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert scaler.is_enabled() is (dtype == torch.float16)
