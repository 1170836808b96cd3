"""Sparse fine-tuning with SAM parameter selection (Fu et al., AAAI 2023, "On the
Effectiveness of Parameter-Efficient Fine-Tuning", arXiv 2211.15583), federated.

Only k entries of each target weight matrix train: W = W0 + S, where S is zero outside a
fixed set of positions M and |M| = k. Fu et al. show that such sparse fine-tuning
regularizes (it bounds the distance to W0, §3). Their Second-order Approximation Method
(SAM, §4) picks the positions that lower the loss most:

- A second-order Taylor expansion with a diagonal Hessian says that tuning parameter i
  alone lowers the loss by about g_i² / (2 h_ii) (their eq. 7).
- With h constant, the ranking is by |g_i|.
- Their released code sums the signed gradient over a burn-in, at W0 with no step,
  clipped at norm 1, and keeps the top-k entries of |Σ g| in each matrix.

``selection: magnitude`` keeps the largest |W0| instead, and ``random`` a uniform draw.
Both need no data.

**Federated selection.** Before round 1, each burn-in node sums its gradient of every
target matrix over ``sparse.burnin_steps`` batches at W0 (the clipping is not applied).
It sends the top ``sparse.score_density`` share of the entries as sign × one scale per
tensor (the ComPEFT codec). The server adds up the decoded sums, Σ_k Σ_t g_{k,t}, and
keeps the top-k positions of |·| in each matrix. The mask goes to every node once, as
Rice-coded gaps between positions (about log2(mn/k) + 2 bits per position, the same coder
as :mod:`fedpeft.compression.rice`). From then on, only the k values travel, with no
position bits: the weighted mean of the clients' value vectors is the exact mean of
their S.

**Carrier.** peft's SHiRA adapter (Bhardwaj et al., 2024, "Sparse High Rank Adapters")
holds exactly this: a value vector ``shira_weight`` (k,) and its positions
``shira_indices`` (2, k) per module, added to W0 in the forward pass. SHiRA sizes k as
r(m+n) for an m×n matrix. ``sparse.density`` therefore becomes one SHiRA r (see
:func:`shira_rank`). A saved adapter holds the positions, so ``PeftModel.from_pretrained``
reloads it exactly.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import numpy as np
import torch
from peft import PeftModel, ShiraConfig, TaskType, get_peft_model

from fedpeft.compression import codec
from fedpeft.compression.compeft import Ternary
from fedpeft.compression.rice import Sparse
from fedpeft.config import ModelConfig, SparseConfig
from fedpeft.errors import ModelError
from fedpeft.types import State

# SHiRA builds a sparse COO tensor per forward pass from positions this module checked
# when they arrived (mask_from_wire); torch's per-call warning about skipped checks is noise
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

W_SUFFIX = ".shira_weight"  # a module's exchanged value vector (k,)
MASK_SEED = 0  # SHiRA's placeholder mask at build time; the run's mask replaces it
# the attention and MLP projections, per architecture: a regex over module paths for BERT
# (its pooler's "dense" is not one), transformers' module names for Llama-like models
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS: dict[str, str | tuple[str, ...]] = {
    "bert": r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)",
    "llama": LLAMA_PROJECTIONS,
    "mistral": LLAMA_PROJECTIONS,
    "qwen2": LLAMA_PROJECTIONS,
}
PACKED_KEYS = ("shapes", "ndims", "kept", "rice", "nbytes")


def shira_rank(density: float, m: int, n: int) -> int:
    """SHiRA's r for ``density`` on an m×n matrix: k = r(m+n) ≈ density·mn."""
    return max(1, round(density * m * n / (m + n)))


def targets(model: torch.nn.Module, sparse: SparseConfig, name: str) -> str | tuple[str, ...]:
    """peft's ``target_modules`` for the sparse matrices: ``sparse.targets`` or the
    architecture's attention and MLP projections."""
    if sparse.targets is not None:
        return sparse.targets
    model_type = str(getattr(model.config, "model_type", ""))
    if model_type not in DEFAULT_TARGETS:
        raise ModelError(
            f"'sparse.targets' has no default for a {model_type or 'this'} model ('{name}'); "
            "list the weight matrices to train."
        )
    return DEFAULT_TARGETS[model_type]


def _targeted(path: str, names: str | tuple[str, ...]) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return path.rsplit(".", 1)[-1] in names


def _first_linear(
    model: torch.nn.Module, names: str | tuple[str, ...], model_name: str
) -> torch.nn.Linear:
    for path, module in model.named_modules():
        if _targeted(path, names):
            if isinstance(module, torch.nn.Linear):
                return module
            raise ModelError(
                f"'{path}' of '{model_name}' is a {type(module).__name__}; sparse fine-tuning "
                "(SHiRA) trains torch.nn.Linear weights only."
            )
    raise ModelError(f"No module matches {names!r} in '{model_name}' ('sparse.targets').")


def build(base: Any, model_cfg: ModelConfig, sparse: SparseConfig, train_head: bool) -> PeftModel:
    """``base`` with SHiRA adapters of density ``sparse.density`` on the target matrices,
    their values at zero and a seeded placeholder mask (:func:`install_mask` sets the
    run's). Every target must be an nn.Linear."""
    names = targets(base, sparse, model_cfg.name)
    first = _first_linear(base, names, model_cfg.name)
    m, n = first.weight.shape
    if model_cfg.task == "classification":
        task_type: TaskType | None = TaskType.SEQ_CLS if train_head else None
    else:
        task_type = TaskType.CAUSAL_LM
    config = ShiraConfig(
        r=shira_rank(sparse.density, int(m), int(n)),
        target_modules=names if isinstance(names, str) else list(names),
        random_seed=MASK_SEED,
        task_type=task_type,
    )
    try:
        with torch.random.fork_rng(devices=[]):
            model = get_peft_model(base, config)
    except ValueError as err:
        raise ModelError(f"'sparse' does not fit model '{model_cfg.name}': {err}") from err
    return model


def module_names(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The sparse modules, by peft's state-dict names (without the suffix)."""
    return sorted(k.removesuffix(W_SUFFIX) for k in shapes if k.endswith(W_SUFFIX))


def matrix_shapes(model: torch.nn.Module, modules: list[str]) -> dict[str, tuple[int, int]]:
    """module -> (m, n) of each sparse module's W0."""
    out = {}
    for module in modules:
        layer: Any = model.get_submodule(module)
        m, n = layer.base_layer.weight.shape
        out[module] = (int(m), int(n))
    return out


def kept(model: torch.nn.Module, modules: list[str]) -> dict[str, int]:
    """module -> k, the entries SHiRA trains there."""
    layers: dict[str, Any] = {m: model.get_submodule(m) for m in modules}
    return {m: int(layer.shira_weight["default"].numel()) for m, layer in layers.items()}


# --------------------------------------------------------------------- selection (server)
def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat positions of the k largest |scores|; ties by position."""
    flat = np.abs(np.asarray(scores, np.float64)).ravel()
    # a stable sort on -|s| breaks ties by position, so every server picks the same set
    return np.sort(np.argsort(-flat, kind="stable")[:k]).astype(np.int64)


def select(
    selection: str,
    kept_per_module: dict[str, int],
    shapes: dict[str, tuple[int, int]],
    *,
    scores: State | None = None,
    weights: State | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """module -> sorted flat positions of its k trained entries: the top-k |Σ g| (SAM,
    ``scores``), the top-k |W0| (``weights``), or k uniform positions (``seed``)."""
    rng = np.random.default_rng([seed, 0x5A])
    chosen = {}
    for module in sorted(kept_per_module):
        k, (m, n) = kept_per_module[module], shapes[module]
        if selection == "sam":
            assert scores is not None
            chosen[module] = top_k(scores[module], k)
        elif selection == "magnitude":
            assert weights is not None
            chosen[module] = top_k(weights[module], k)
        else:
            chosen[module] = np.sort(rng.choice(m * n, size=k, replace=False)).astype(np.int64)
    return chosen


# --------------------------------------------------------------------- the mask on the wire
def mask_to_wire(positions: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]]) -> State:
    """The mask as a node receives it: per module its positions, Rice-coded gaps
    (:func:`fedpeft.compression.codec.pack`; the sign bits it also writes are all 0)."""
    sent = {
        module: Ternary(
            shape=shapes[module],
            sparse=Sparse(
                size=math.prod(shapes[module]),
                positions=positions[module],
                negative=np.zeros(positions[module].size, bool),
            ),
            scale=1.0,
        )
        for module in positions
    }
    packed = codec.pack(sent)
    state: State = {"stream": packed.stream, "scales": packed.scales}
    for key in PACKED_KEYS:
        state[key] = np.asarray(getattr(packed, key), np.int64)
    return state


def mask_from_wire(
    structure: State, shapes: dict[str, tuple[int, int]], kept_per_module: dict[str, int]
) -> dict[str, np.ndarray]:
    """module -> sorted flat positions, decoded and checked against the shapes and the
    number of entries this node's model trains in each."""
    packed = codec.Packed(
        stream=structure["stream"],
        scales=structure["scales"],
        **{key: [int(v) for v in structure[key]] for key in PACKED_KEYS},
    )
    decoded = codec.unpack(packed, dict(shapes))
    positions = {m: t.sparse.positions.astype(np.int64) for m, t in decoded.items()}
    for module, k in kept_per_module.items():
        if positions.get(module, np.zeros(0)).size != k:
            raise ModelError(f"The sparse mask does not hold {k} positions for '{module}'.")
    return positions


def install_mask(model: torch.nn.Module, positions: dict[str, np.ndarray]) -> None:
    """Set each module's SHiRA positions (2, k) to ``positions`` (flat, row-major)."""
    for module, flat in positions.items():
        layer: Any = model.get_submodule(module)
        n = layer.base_layer.weight.shape[1]
        rows, cols = np.divmod(flat, n)
        device = layer.shira_weight["default"].device
        layer.shira_indices["default"] = torch.from_numpy(np.stack([rows, cols])).to(
            device=device, dtype=torch.int
        )


def density_report(
    shapes: dict[str, tuple[int, int]], kept_per_module: dict[str, int]
) -> dict[str, float]:
    """The real density per matrix shape and overall."""
    total = sum(math.prod(s) for s in shapes.values())
    report = {"overall": sum(kept_per_module.values()) / total}
    for module, (m, n) in shapes.items():
        report.setdefault(f"{m}x{n}", kept_per_module[module] / (m * n))
    return report
