"""Where a client trains and in what precision: the device, the autocast dtype, a 4-bit
base (QLoRA, Dettmers et al., 2023, §3: NF4 weights with double quantization, bf16
compute) and activation checkpointing (Chen et al., 2016, "Training Deep Nets with
Sublinear Memory Cost": keep each layer's input, recompute the rest during backward).

Small pure functions. What the machine offers (``cuda``, ``mps``, ``bf16``,
``bitsandbytes``) is probed from torch only when the caller does not say, so every
decision is tested on a CPU. A refusal is a :class:`ConfigError` naming the key, like the
CLI's check of ``simulation.client_cpus`` against the cores: the fix is in the config.
"""

from __future__ import annotations

import importlib
import tempfile
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from transformers import PreTrainedModel

from fedpeft.config import Config, ConfigError

# transformers' default too; the reentrant variant drops the LoRA gradients of a layer
# whose input does not require grad (a frozen embedding's output)
NON_REENTRANT = {"use_reentrant": False}


def cuda_count() -> int:
    """CUDA devices torch sees (0 on a CPU build, or in a Ray actor given no GPU)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    return bool(torch.backends.mps.is_available())


def bf16_supported() -> bool:
    """Native bfloat16 (compute capability 8.0+); torch's emulation on older GPUs is slow."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_device(choice: str, cuda: int | None = None, mps: bool | None = None) -> torch.device:
    """``train.device`` -> a torch device; ``auto`` is the first of CUDA, MPS and CPU.

    ``cuda`` is the number of CUDA devices (a bool counts as 0 or 1), ``mps`` whether
    MPS is available; ``None`` probes torch.
    """
    cuda = cuda_count() if cuda is None else int(cuda)
    mps = mps_available() if mps is None else mps
    if choice == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and cuda == 0:
        raise ConfigError(f"'train.device: {choice}' needs a CUDA GPU, and torch sees none.")
    if device.type == "cuda" and (device.index or 0) >= cuda:
        raise ConfigError(
            f"'train.device: {choice}' names a GPU torch does not see (it sees {cuda})."
        )
    if device.type == "mps" and not mps:
        raise ConfigError(f"'train.device: {choice}' needs Apple's MPS, which is unavailable.")
    return device


def autocast_dtype(
    device: torch.device, precision: str, bf16: bool | None = None
) -> torch.dtype | None:
    """``train.precision`` on ``device`` -> the autocast dtype (``None``: plain fp32).

    ``auto`` is bf16 on a CUDA GPU with native bf16 and fp32 everywhere else: fp16 needs
    loss scaling and can overflow, and CPU bf16 is slower than fp32 without AMX. ``bf16``
    runs on such a GPU or, asked for explicitly, on a CPU; ``fp16`` on CUDA only (with
    :func:`grad_scaler`). MPS trains in fp32. ``bf16``: native bf16 (``None``: probe).
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        native = bf16_supported() if bf16 is None else bf16
        if precision == "fp16":
            return torch.float16
        if native:
            return torch.bfloat16
        if precision == "auto":
            return None
        raise ConfigError(
            "'train.precision: bf16' needs a GPU with native bfloat16 (compute capability "
            "8.0 or later); use fp16 or fp32 on this one."
        )
    if precision == "bf16" and device.type == "cpu":
        return torch.bfloat16
    if precision == "auto":
        return None
    raise ConfigError(
        f"'train.precision: {precision}' needs a CUDA GPU, and training is on "
        f"{device.type}; use auto or fp32."
    )


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Mixed precision for a forward pass: torch.autocast, or nothing for fp32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling, on for fp16 only (bf16 has fp32's range); disabled, its ``scale``,
    ``step`` and ``update`` are the plain loss, ``optimizer.step()`` and nothing."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def check_quantization(
    load_in_4bit: bool, device: torch.device, bitsandbytes: bool | None = None
) -> None:
    """``model.load_in_4bit`` needs training on CUDA with bitsandbytes importable
    (``bitsandbytes``: whether it imports; ``None``: try)."""
    if not load_in_4bit:
        return
    if device.type != "cuda":
        raise ConfigError(
            "'model.load_in_4bit' needs training on a CUDA GPU (bitsandbytes' 4-bit "
            f"kernels), not on {device.type}; set it to false."
        )
    if not (_bitsandbytes_imports() if bitsandbytes is None else bitsandbytes):
        raise ConfigError(
            "'model.load_in_4bit' needs bitsandbytes, which does not import here "
            "(`pip install bitsandbytes`); set it to false."
        )


def quantization_kwargs(
    load_in_4bit: bool,
    device: torch.device,
    bitsandbytes: bool | None = None,
    bf16: bool | None = None,
) -> dict[str, Any]:
    """``from_pretrained`` arguments of ``model.load_in_4bit``: QLoRA's NF4 base with
    double quantization, computing in bf16 where native, else fp16, on ``device``.
    Checked (:func:`check_quantization`) before any weight is read."""
    check_quantization(load_in_4bit, device, bitsandbytes)
    if not load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    native = bf16_supported() if bf16 is None else bf16
    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if native else torch.float16,
    )
    index = torch.cuda.current_device() if device.index is None else device.index
    return {"quantization_config": config, "device_map": {"": index}}


def _bitsandbytes_imports() -> bool:
    try:
        importlib.import_module("bitsandbytes")
    except (ImportError, OSError, RuntimeError):  # absent, or built without its CUDA libraries
        return False
    return True


def reload_quantized(model: PreTrainedModel, kwargs: dict[str, Any]) -> PreTrainedModel:
    """``model`` saved and loaded again with ``kwargs``: transformers quantizes while it
    loads weights, and the tiny test models are built from a config, not loaded."""
    with tempfile.TemporaryDirectory(prefix="fedpeft-4bit-") as directory:
        model.save_pretrained(directory)
        loaded: PreTrainedModel = type(model).from_pretrained(directory, **kwargs)
    return loaded


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in backward instead of keeping them.

    The input embeddings' output is made to require grad (peft's recipe for adapters on
    a frozen base) so that a checkpointed layer always has a gradient to pass on.
    """
    if not model.supports_gradient_checkpointing:
        raise ConfigError(
            f"'train.gradient_checkpointing' is not supported by {type(model).__name__}; "
            "set it to false."
        )
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5; hooks inputs too
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)  # type: ignore[no-untyped-call]
    model.enable_input_require_grads()  # type: ignore[no-untyped-call]


def check_devices(
    cfg: Config,
    cuda: int | None = None,
    mps: bool | None = None,
    bf16: bool | None = None,
    bitsandbytes: bool | None = None,
) -> torch.device:
    """Every device key of ``cfg`` against this machine, before any loading; returns the
    training device. For the CLI's preflight and a SuperNode's first message."""
    device = resolve_device(cfg.train.device, cuda, mps)
    autocast_dtype(device, cfg.train.precision, bf16)
    check_quantization(cfg.model.load_in_4bit, device, bitsandbytes)
    if cfg.model.load_in_4bit and (device.index or 0) > 0:
        raise ConfigError(
            "'model.load_in_4bit' loads the base on the current GPU; use 'train.device: "
            "cuda' and choose the GPU with CUDA_VISIBLE_DEVICES."
        )
    return device


def check_client_gpus(cfg: Config, cuda: int | None = None) -> None:
    """``simulation.client_gpus`` against the run and this machine (the simulation's
    preflight). Ray hides every GPU from an actor given none (CUDA_VISIBLE_DEVICES="")."""
    sim = cfg.simulation
    if sim.client_gpus == 0:
        if cfg.train.device.startswith("cuda") or cfg.model.load_in_4bit:
            raise ConfigError(
                "Virtual clients see no GPU with 'simulation.client_gpus: 0', but "
                "'train.device' or 'model.load_in_4bit' needs one; give each a share "
                "(e.g. 0.5)."
            )
        return
    if sim.ray_address:  # the cluster's nodes state their own GPUs
        return
    count = cuda_count() if cuda is None else int(cuda)
    if count == 0:
        raise ConfigError(
            f"'simulation.client_gpus' ({sim.client_gpus:g}) needs a CUDA GPU, and torch "
            "sees none on this machine."
        )
    if sim.client_gpus > count:
        raise ConfigError(
            f"'simulation.client_gpus' ({sim.client_gpus:g}) exceeds the {count} CUDA GPUs "
            "available."
        )
