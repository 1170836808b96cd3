"""LoRA-SB (Ponkshe, Singhal et al., 2024, "Initialization Using Update Approximation is
a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning", arXiv 2411.19557) and its
federated form Fed-SB (Singhal et al., 2025, arXiv 2502.15436).

Each adapted weight is W = W0 + B R A (LoRA-XS's architecture): B (m×r) and A (r×n) are
fixed, and only the r×r matrix R is trained and exchanged.

**Initialization** (LoRA-SB §4). The first update of full fine-tuning with Adam is about
ΔW ≈ −η sign(Σ_t g_t). Its best rank-r approximation U_r Σ_r V_rᵀ (a truncated SVD) gives
B = U_r, R = Σ_r and A = V_rᵀ, with the LoRA scale fixed at 1. The adapter therefore
starts as that first step, not at zero.

**Federated initialization.** LoRA-SB and Fed-SB compute the gradient on the training data
in one place. Here the data stays on the nodes:

1. Before round 1, each burn-in client sums the gradient of every adapted W0 over
   ``lora_sb.burnin_steps`` batches at the base model, taking no step.
2. It sends only the top-k entries of that sum as sign × one scale per tensor (the
   ComPEFT codec, ``lora_sb.score_density``).
3. The server adds up the decoded tensors, takes −η sign of the sum, and truncates its
   SVD to rank r.

B and A are then quantized to int8, with one scale per column of B and per row of A, and
the server uses the dequantized bases itself. Every node and the server therefore hold
bit-identical B and A. A node receives them once, in its first message of the run.

**Aggregation** (Fed-SB §3). With B and A shared, ΔW_k = B ΔR_k A is linear in ΔR_k, so

    Σ_k p_k ΔW_k = B (Σ_k p_k ΔR_k) A,

and the weighted mean of the Rs (FedIT on R) is the exact mean of the clients' ΔW. There
are no cross terms, unlike averaging LoRA's A and B separately.

**Export.** B R A is the LoRA adapter lora_B = B R, lora_A = A at scale 1: the saved
adapter is a plain peft LoRA adapter that ``PeftModel.from_pretrained`` loads.

Training uses peft's own LoRA layers. A parametrization (:func:`attach`) makes lora_B's
weight the product B R, with R as the one trainable tensor, and lora_A is frozen.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parametrize

from fedpeft.config import Config, LoraConfig
from fedpeft.errors import ModelError
from fedpeft.models import adapter_shapes
from fedpeft.types import State

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
R_SUFFIX = ".lora_R.weight"  # the exchanged r×r matrix of a module
BASIS_B = ".B"  # keys of a basis: module + ".B" (m×r), module + ".A" (r×n)
BASIS_A = ".A"
INT8_MAX = 127
SVD_SEED = 0  # torch.svd_lowrank draws a random test matrix; fixed, so reruns agree
SVD_POWER_ITERATIONS = 4


def carrier_lora(lora: LoraConfig) -> LoraConfig:
    """The peft LoRA that carries B R A: lora_B = B R, lora_A = A, scale exactly 1."""
    return dataclasses.replace(lora, alpha=float(lora.r), scaling="fixed")


def module_names(lora_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The adapted modules, named as peft's state dict names them (without the suffix)."""
    return sorted(k.removesuffix(A_SUFFIX) for k in lora_shapes if k.endswith(A_SUFFIX))


def exchanged_shapes(lora_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """What a LoRA-SB client exchanges: each module's R (r×r) and the task head, from the
    shapes of the carrier LoRA."""
    shapes = {k: v for k, v in lora_shapes.items() if not k.endswith((A_SUFFIX, B_SUFFIX))}
    for module in module_names(lora_shapes):
        r = lora_shapes[module + A_SUFFIX][0]
        shapes[module + R_SUFFIX] = (r, r)
    return shapes


def run_shapes(cfg: Config, num_labels: int) -> dict[str, tuple[int, ...]]:
    """The shapes one client of run ``cfg`` (its ``lora`` section) sends per round, for
    any ``peft.method``."""
    if cfg.peft.method == "sparse":
        return adapter_shapes(cfg.model, cfg.lora, num_labels, sparse=cfg.sparse)
    if cfg.peft.method != "lora_sb":
        return adapter_shapes(cfg.model, cfg.lora, num_labels)
    return exchanged_shapes(adapter_shapes(cfg.model, carrier_lora(cfg.lora), num_labels))


def weight_shapes(lora_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """module -> (m, n) of W0 for every adapted module: the burn-in's gradient shapes."""
    out: dict[str, tuple[int, ...]] = {}
    for module in module_names(lora_shapes):
        out[module] = (lora_shapes[module + B_SUFFIX][0], lora_shapes[module + A_SUFFIX][1])
    return out


def to_lora(sb: State, basis: State) -> State:
    """The carrier LoRA's state for exchanged state ``sb``: lora_B = B R, lora_A = A."""
    lora = {k: v for k, v in sb.items() if not k.endswith(R_SUFFIX)}
    for key, r_matrix in sb.items():
        if not key.endswith(R_SUFFIX):
            continue
        module = key.removesuffix(R_SUFFIX)
        b, a = basis[module + BASIS_B], basis[module + BASIS_A]
        lora[module + B_SUFFIX] = (b.astype(np.float64) @ r_matrix).astype(np.float32)
        lora[module + A_SUFFIX] = a.astype(np.float32)
    return lora


# --------------------------------------------------------------------- initialization
def initial_update(score_sum: np.ndarray, eta: float) -> np.ndarray:
    """LoRA-SB's first full-fine-tuning step: −η sign(Σ g) (entries nobody sent are 0)."""
    update: np.ndarray = (-eta * np.sign(score_sum)).astype(np.float32)
    return update


def truncated_svd(update: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U_r (m×r), Σ_r (r) and V_rᵀ (r×n) of ``update``, by randomized SVD (Halko et al.,
    2011, as torch.svd_lowrank, which LoRA-SB uses) with a fixed seed."""
    m, n = update.shape
    if rank > min(m, n):
        raise ModelError(f"LoRA-SB rank {rank} exceeds the smaller side of a {m}×{n} weight.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SVD_SEED)
        u, s, v = torch.svd_lowrank(
            torch.from_numpy(update).double(), q=rank, niter=SVD_POWER_ITERATIONS
        )
    return u.numpy(), s.numpy(), v.numpy().T


def quantized(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of ``x`` with one scale per slice along ``axis`` (the scales
    are the slices' max |x| / 127, float32)."""
    peak = np.abs(x).max(axis=axis, keepdims=True)
    scale = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes, scale.squeeze(axis)


def dequantized(codes: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """float32(codes) × scale: one elementwise product, the same bits on every machine."""
    return codes.astype(np.float32) * np.expand_dims(scale.astype(np.float32), axis)


def init_from_scores(score_sums: State, rank: int, eta: float) -> tuple[State, State]:
    """The basis each node receives (int8 codes and scales, as sent) and the initial R of
    every module, from the summed burn-in scores (module -> Σ_k of the clients' decoded
    gradients, m×n)."""
    wire_basis: State = {}
    initial_r: State = {}
    for module in sorted(score_sums):
        u, s, vt = truncated_svd(initial_update(score_sums[module], eta), rank)
        wire_basis.update(_quantized_basis(module, u, vt))
        initial_r[module + R_SUFFIX] = np.diag(s).astype(np.float32)
    return wire_basis, initial_r


def init_from_weights(weights: State, rank: int) -> tuple[State, State]:
    """LoRA-XS's initialization (Bałazy et al., 2024): B = U_r and A = V_rᵀ of each base
    weight W0 (module -> m×n), quantized as :func:`init_from_scores` does, and R = 0 (the
    adapter starts as a no-op). Needs no data, so nothing is released before round 1."""
    wire_basis: State = {}
    initial_r: State = {}
    for module in sorted(weights):
        u, _, vt = truncated_svd(weights[module].astype(np.float32), rank)
        wire_basis.update(_quantized_basis(module, u, vt))
        initial_r[module + R_SUFFIX] = np.zeros((rank, rank), np.float32)
    return wire_basis, initial_r


def _quantized_basis(module: str, u: np.ndarray, vt: np.ndarray) -> State:
    b_codes, b_scale = quantized(u, axis=0)  # one scale per column of B
    a_codes, a_scale = quantized(vt, axis=1)  # one scale per row of A
    return {
        module + BASIS_B: b_codes,
        module + BASIS_B + ".scale": b_scale,
        module + BASIS_A: a_codes,
        module + BASIS_A + ".scale": a_scale,
    }


def basis_from_wire(wire_basis: State) -> State:
    """The float32 B and A every node uses, from the int8 codes and scales it received."""
    basis: State = {}
    for key, codes in wire_basis.items():
        if key.endswith(BASIS_B):
            basis[key] = dequantized(codes, wire_basis[key + ".scale"], axis=0)
        elif key.endswith(BASIS_A):
            basis[key] = dequantized(codes, wire_basis[key + ".scale"], axis=1)
    return basis


def digest(wire_basis: State) -> str:
    """A short name of a basis: the SHA-256 of its tensors' names and bytes."""
    h = hashlib.sha256()
    for key in sorted(wire_basis):
        h.update(key.encode())
        h.update(np.ascontiguousarray(wire_basis[key]).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------- training
class TimesFixed(torch.nn.Module):
    """Parametrization lora_B.weight := B R: R is the tensor that trains, B is fixed."""

    def __init__(self, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("b", b, persistent=False)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        b: torch.Tensor = self.b  # type: ignore[assignment]
        return b.to(r.dtype) @ r

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # the R whose B R is closest to ``weight`` (attach then sets R exactly)
        b: torch.Tensor = self.b  # type: ignore[assignment]
        solution: torch.Tensor = torch.linalg.lstsq(b.to(weight.dtype), weight).solution
        return solution


def _lora_layer(model: torch.nn.Module, module: str) -> Any:
    return model.get_submodule(module)  # peft's state-dict names are the full paths


def _lora_b(model: torch.nn.Module, module: str) -> torch.nn.Module:
    found: torch.nn.Module = _lora_layer(model, module).lora_B["default"]
    return found


def _original_weight(lora_b: torch.nn.Module) -> torch.Tensor:
    weight: torch.Tensor = lora_b.weight  # type: ignore[assignment]  # an nn.Linear's
    return weight


def _original(lora_b: torch.nn.Module) -> torch.Tensor:
    """R: the tensor a parametrized lora_B keeps (``weight`` is computed as B R)."""
    parametrizations: Any = lora_b.parametrizations
    original: torch.Tensor = parametrizations.weight.original
    return original


def _freeze_a(model: torch.nn.Module, module: str, frozen: bool) -> None:
    _lora_layer(model, module).lora_A["default"].weight.requires_grad_(not frozen)


def attach(model: torch.nn.Module, sb: State, basis: State) -> None:
    """Make ``model`` (the carrier LoRA, its state loaded) train R only: lora_B's weight
    becomes B R with R := the exchanged value, lora_A (= A) is frozen."""
    for key, r_matrix in sb.items():
        if not key.endswith(R_SUFFIX):
            continue
        module = key.removesuffix(R_SUFFIX)
        lora_b = _lora_b(model, module)
        device = _original_weight(lora_b).device
        b = torch.from_numpy(basis[module + BASIS_B]).to(device)
        parametrize.register_parametrization(lora_b, "weight", TimesFixed(b))
        with torch.no_grad():
            _original(lora_b).copy_(torch.from_numpy(r_matrix))
        _freeze_a(model, module, True)


def trained_r(model: torch.nn.Module, sb: State) -> State:
    """Each module's R as ``model`` holds it now (``sb`` names the modules)."""
    out: State = {}
    for key in sb:
        if key.endswith(R_SUFFIX):
            r_matrix = _original(_lora_b(model, key.removesuffix(R_SUFFIX)))
            out[key] = r_matrix.detach().to(torch.float32).cpu().numpy().copy()
    return out


def detach(model: torch.nn.Module, sb: State) -> None:
    """Back to the plain carrier LoRA (lora_B = B R as a tensor, lora_A trainable), so a
    cached model serves the next message, of any method, as built."""
    for key in sb:
        if key.endswith(R_SUFFIX):
            module = key.removesuffix(R_SUFFIX)
            lora_b = _lora_b(model, module)
            if parametrize.is_parametrized(lora_b, "weight"):
                parametrize.remove_parametrizations(lora_b, "weight", leave_parametrized=True)
            _freeze_a(model, module, False)
