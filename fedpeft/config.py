"""Run configuration: YAML -> frozen dataclasses, every validation rule in one place.

A config file is a nested mapping whose sections mirror the dataclasses below. Loading
checks, in order: unknown keys, types, then the value rules of each section (small named
checks). Every failure raises :class:`ConfigError` with one sentence naming the key and
what was expected, so the CLI can print it instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or a ``--set`` override."""


Task = Literal["classification", "causal_lm"]
Scheme = Literal["iid", "dirichlet", "shard"]


@dataclass(frozen=True)
class ModelConfig:
    """The base model.

    Args:
        name: ``minilm`` (the packaged all-MiniLM-L6-v2, offline), ``smollm2`` (the
            packaged SmolLM2-135M-Instruct GGUF, dequantized once and cached, offline),
            ``tiny-bert``, ``tiny-gpt2`` or ``tiny-llama`` (built from config, for
            tests; tiny-llama has SmolLM2's tokenizer), a local Hugging Face model
            directory, a ``.gguf`` file, or a hub id (needs network).
        task: ``classification`` (sequence classification head) or ``causal_lm``.
        max_length: token budget per example; longer texts are truncated.
        dropout: probability of every dropout layer of the base model (and its head);
            ``null`` keeps the model's own (0.1 for BERT and GPT-2). LoRA's own dropout
            is ``lora.dropout``.
        pooling: what the classification head of a BERT-like model reads: ``cls``
            (the model's pooler, tanh(W h_[CLS])) or ``mean`` (the mean of the token
            states under the attention mask, the pooling sentence-transformers
            checkpoints such as all-MiniLM-L6-v2 were trained with).
        load_in_4bit: QLoRA (Dettmers et al., 2023): the frozen base in 4-bit NF4 with
            double quantization, the adapters in fp32. Needs a CUDA GPU and bitsandbytes;
            without either the run is refused before loading.
    """

    name: str = "minilm"
    task: Task = "classification"
    max_length: int = 64
    dropout: float | None = None
    pooling: Literal["cls", "mean"] = "cls"
    load_in_4bit: bool = False


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (Hu et al., 2021): W + (alpha / r) * B A on the target modules.

    Args:
        r: default rank of every adapted module.
        alpha: LoRA scaling numerator; the update is scaled by alpha / r.
        dropout: dropout on the adapter input.
        target_modules: module names to adapt; ``null`` uses peft's default for the
            model type (query/value for BERT, c_attn for GPT-2, q_proj/v_proj for Llama).
        layers_to_transform: transformer layer indices that get adapters (``null``: all).
        rank_pattern: per-module rank overrides, peft's regex-key format.
        train_head: whether the task head (classifier) is trained and exchanged.
        scaling: the factor s(r) on B A of a module of rank r: ``fixed`` (default),
            alpha / ``r`` above for every module whatever its own rank, so that in a fleet
            of mixed ranks an optimizer step moves each client's product alike (with one
            rank everywhere it is alpha / r); ``standard``, alpha / r_module (Hu et al.,
            peft's default; a rank-1 phone then moves 16× as far as a rank-16 laptop);
            ``rslora``, alpha / sqrt(r_module) (Kalajdzievski, 2023).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    layers_to_transform: tuple[int, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    train_head: bool = True
    scaling: str = "fixed"

    def __hash__(self) -> int:  # rank_pattern is a dict; hash its canonical JSON
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    def scaling_for(self, rank: int) -> float:
        """s(r): the factor LoRA applies to B A in a module of rank ``rank``."""
        if self.scaling == "fixed":
            return self.alpha / self.r
        if self.scaling == "rslora":
            return self.alpha / math.sqrt(rank)
        return self.alpha / rank


@dataclass(frozen=True)
class PeftConfig:
    """Which parameter-efficient method is trained and exchanged.

    Args:
        method: ``lora`` (default; the ``lora`` section); ``lora_sb`` (LoRA-SB /
            Fed-SB: W0 + B R A with B and A fixed from a federated burn-in and only the
            r×r matrix R trained and sent; the ``lora`` section's ``r`` and
            ``target_modules``, and the ``lora_sb`` section; docs/lora-sb.md); or
            ``sparse`` (sparse fine-tuning of the base weights at positions chosen once
            for the whole federation, Fu et al.'s SAM by default; the ``sparse``
            section; docs/sparse.md).
    """

    method: Literal["lora", "lora_sb", "sparse"] = "lora"


@dataclass(frozen=True)
class SparseConfig:
    """Sparse fine-tuning (``peft.method: sparse``, docs/sparse.md): a few entries of each
    target weight matrix train, at positions every node shares, carried by peft's SHiRA
    adapter.

    Args:
        density: share of each target matrix's entries that train. SHiRA keeps r(m+n)
            entries of an m×n matrix, so r = max(1, round(density·mn/(m+n))) on the
            first target matrix, and the real density per matrix is r(m+n)/(mn)
            (``summary.json`` reports it).
        selection: which entries. ``sam`` (Fu et al., 2023): the largest |Σ g| over a
            burn-in, summed over the burn-in nodes; ``magnitude``: the largest |W0|;
            ``random``: uniform, seeded by the run's seed. Only ``sam`` reads data.
        burnin_steps: batches over which each burn-in node sums its gradient (``sam``).
        score_density: share of each summed gradient's entries a burn-in node sends
            (top-k, sign x one scale per tensor; ``sam``).
        targets: the weight matrices that train (module names, as peft's
            ``target_modules``); ``null``: the attention and MLP projections of a BERT or
            Llama model.
    """

    density: float = 0.005
    selection: Literal["sam", "magnitude", "random"] = "sam"
    burnin_steps: int = 8
    score_density: float = 0.01
    targets: tuple[str, ...] | None = None


@dataclass(frozen=True)
class LoraSBConfig:
    """LoRA-SB's federated initialization (``peft.method: lora_sb``, docs/lora-sb.md).

    Args:
        init: where B and A come from. ``gradient`` (LoRA-SB): the truncated SVD of the
            first update −η sign(Σ g), Σ g summed by the nodes in a burn-in before round 1
            (R starts at its singular values). ``weights`` (LoRA-XS, Bałazy et al.,
            2024): the truncated SVD of the base weight W0 itself, computed by the server
            with no burn-in and no data (R starts at zero); the one allowed under DP,
            whose accountant does not cover a burn-in.
        burnin_steps: batches over which each burn-in client sums the gradient of every
            adapted weight at the base model, before round 1 (no step is taken).
        score_density: share of each summed gradient's entries a burn-in client sends
            (its top-k by magnitude, as sign x one scale per tensor).
        init_lr: η of the initial update −η sign(Σ g) whose best rank-r approximation
            gives B, R and A (LoRA-SB's first Adam step); ``null``: ``train.lr``.
    """

    init: Literal["gradient", "weights"] = "gradient"
    burnin_steps: int = 8
    score_density: float = 0.01
    init_lr: float | None = None


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from.

    Args:
        source: ``synthetic`` (generated by fedpeft), a local ``.jsonl``/``.csv`` file,
            or ``hf:<dataset id>`` (flwr-datasets, needs network).
        test_source: held-out file; ``null`` holds out ``test_fraction`` of ``source``.
        text_field: name of the text column.
        label_field: name of the label column (classification).
        test_fraction: share of ``source`` held out when there is no ``test_source``.
        max_train_samples: cap on training examples (``null``: all).
        max_test_samples: cap on held-out examples (``null``: all).
        synthetic_samples: examples generated for the synthetic task.
        synthetic_classes: number of classes of the synthetic task.
        format: how a row of a ``causal_lm`` run reads (classification ignores it):
            ``auto`` (an ``instruction``/``output`` record is ``alpaca``, a ``messages``
            record ``chat``, anything else ``text``); ``alpaca`` (``instruction``, an
            optional ``input``, ``output``); ``chat`` (``messages``: role/content turns
            ending with the assistant's); ``text`` (the text field as it is, every token
            trained; with ``prompt`` each labelled row becomes an instruction).
            Instructions are rendered with the tokenizer's chat template and trained on
            the response tokens only.
        prompt: turns a labelled row of a ``causal_lm`` run into an instruction: the
            user turn, with ``{text}`` replaced by the row's text; the answer is its
            label's word in ``label_words``.
        label_words: the answer for each label, in label order (numeric labels in
            numeric order, others alphabetically), e.g. ``[negative, positive]``;
            ``null`` uses the label names themselves.
        system: the system turn of every instruction that has none (``fedpeft
            generate`` asks with it too); ``null`` leaves it to the chat template (which
            may add its own default: SmolLM2's is 16 tokens), ``""`` an empty turn.
    """

    source: str = "synthetic"
    test_source: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    test_fraction: float = 0.1
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    synthetic_samples: int = 2000
    synthetic_classes: int = 4
    format: Literal["auto", "alpaca", "chat", "text"] = "auto"
    prompt: str | None = None
    label_words: tuple[str, ...] | None = None
    system: str | None = None


@dataclass(frozen=True)
class PartitionConfig:
    """How training examples are split over clients (flwr-datasets partitioners).

    Args:
        num_clients: number of (virtual) clients.
        scheme: ``iid``, ``dirichlet`` (label skew, Hsu et al. 2019) or ``shard``
            (McMahan et al. 2017).
        alpha: Dirichlet concentration; smaller is more skewed.
        shards_per_client: shards per client for ``shard``.
        client_test_fraction: share of each client's partition kept for client-side
            evaluation.
    """

    num_clients: int = 5
    scheme: Scheme = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    client_test_fraction: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client (on the adapter parameters).

    Args:
        local_steps: optimizer steps per round.
        batch_size: examples per step.
        lr: learning rate.
        weight_decay: weight decay (decoupled for AdamW, L2 for SGD).
        optimizer: ``adamw`` or ``sgd``. Plain SGD keeps an update a linear function of
            the gradients (fedSGD; what the gradient-inversion audit assumes), and under
            DP-SGD it does not rescale the noise coordinate by coordinate as Adam does.
        momentum: SGD momentum (heavy ball); ``sgd`` only.
        adam_eps: ε of AdamW's step lr · m̂ / (√v̂ + ε). A coordinate whose gradient is
            well below ε moves like SGD at lr / ε, in proportion to its gradient, instead of
            by about lr whatever the gradient's size. ``sgd`` ignores it, so a recipe that
            sets it switches optimizer with one override.
        logit_adjustment: τ of the logit-adjusted loss (Menon et al., 2021; FedLC, Zhang
            et al., 2022): CE(logits + τ log π_client, y), with π_client the client's label
            prior. Under label skew a client then learns features rather than its prior;
            0 is the plain loss. Classification only.
        device: where to train: ``auto`` (the first of CUDA, MPS and CPU), ``cpu``,
            ``cuda``, ``cuda:N`` or ``mps``; one that is absent is refused before loading.
            In a simulation a client sees a GPU only with ``simulation.client_gpus``.
        precision: autocast dtype of the forward pass: ``auto`` (bf16 on a CUDA GPU with
            native bf16, compute capability 8.0+; fp32 elsewhere), ``fp32``, ``bf16`` (such
            a GPU, or a CPU when asked for) or ``fp16`` (CUDA only, with loss scaling).
            The adapters, their gradients and the optimizer state stay fp32.
        gradient_checkpointing: recompute each layer's activations during backward
            instead of keeping them (less activation memory, about a third more compute);
            the gradients are the same.
    """

    local_steps: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    logit_adjustment: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.0
    adam_eps: float = 1e-8
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class FederationConfig:
    """The federated protocol.

    Args:
        rounds: number of rounds.
        fraction_train: share of clients sampled per round.
        min_clients: fewest clients a round may use.
        aggregator: aggregator name from :mod:`fedpeft.aggregation`.
        server_lr: server learning rate η_s (Reddi et al., 2021, "Adaptive Federated
            Optimization"): with ``sgd`` the new global is x + η_s (aggregate − x); 1.0
            is plain FedAvg.
        server_optimizer: the server's step on the pseudo-gradient Δ = aggregate − x:
            ``sgd`` (x + η_s Δ), ``momentum`` (FedAvgM: m ← β m + Δ, x + η_s m) or
            ``adam`` (FedAdam). ``momentum``/``adam`` keep buffers per tensor, so they
            need an aggregator whose factors keep their basis (``fedit``, ``zero_pad``, ``rbla``).
        server_momentum: β of ``momentum``, β₁ of ``adam``.
        server_beta2: β₂ of ``adam``.
        server_tau: τ of ``adam`` (the adaptivity: x + η_s m / (√v + τ)).
        server_eval: evaluate the global adapters on held-out data every round.
        eval_batch_size: batch size for evaluation.
        client_eval: also ask the sampled clients to evaluate on their own held-out split.
        timeout: seconds to wait for the replies of one round.
        max_update_norm: reject any decoded update whose L2 norm over all its tensors
            exceeds this (``null``: no bound). With untrusted clients, pair it with the
            ``median`` or ``trimmed_mean`` aggregator.
    """

    rounds: int = 5
    fraction_train: float = 1.0
    min_clients: int = 2
    aggregator: str = "fedit"
    server_lr: float = 1.0
    server_optimizer: str = "sgd"
    server_momentum: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    server_eval: bool = True
    eval_batch_size: int = 64
    client_eval: bool = False
    timeout: float = 3600.0
    max_update_norm: float | None = None

    def sampled(self, num_nodes: int, fraction: float | None = None) -> int:
        """Nodes sampled per round: ``fraction`` (default ``fraction_train``) of them, at
        least ``min_clients``, at most all."""
        share = self.fraction_train if fraction is None else fraction
        return min(num_nodes, max(self.min_clients, round(share * num_nodes)))


@dataclass(frozen=True)
class FleetConfig:
    """A mix of device profiles (heterogeneous clients); empty means every client gets
    the ``lora`` section as it is.

    Args:
        profiles: device profile YAML files (keys ``name``, ``memory_mb``, ``speed``,
            ``uplink_mbps``), e.g. ``configs/devices/pi.yaml``.
        mix: profile name -> number of clients with it.
        max_rank: highest LoRA rank the planner gives any layer.
        policy: what a device trains. ``adapt``: the plan its memory affords (its own
            depth and ranks). ``bucket``: the plan every device of the fleet affords
            (each layer at its smallest planned rank), so all clients share one shape.
            ``exclude``: the ``lora`` section as it is, on the devices that afford it;
            the others take no part. ``bucket`` and ``exclude`` are the two ways to run
            a mixed fleet without heterogeneous adapters (the baselines of
            ``simulations/bench_hetero.py``).
        assign: which partition each device of ``mix`` gets. ``shuffled``: the mix in an
            order drawn from the seed, independent of the data. ``skewed``: a stress
            fleet in which capacity follows the labels: the devices weakest first (by
            ``memory_mb``) get the partitions holding the most examples of the first
            label, so the weak devices hold most of one class.
    """

    profiles: tuple[str, ...] = ()
    mix: dict[str, int] = field(default_factory=dict)
    max_rank: int = 16
    policy: Literal["adapt", "bucket", "exclude"] = "adapt"
    assign: Literal["shuffled", "skewed"] = "shuffled"

    def __hash__(self) -> int:  # mix is a dict; hash its canonical JSON
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))


@dataclass(frozen=True)
class CompressionConfig:
    """ComPEFT compression of the updates on the wire (:mod:`fedpeft.compression`).

    Args:
        density: share of each update tensor's entries sent (top-k by magnitude), as
            sign x one scale; ``null`` sends fp32 updates.
        scale: ``stc`` (mean magnitude of the kept entries, STC; the default, which
            tracked the fp32 run closest in simulations/bench_compression.py) or
            ``compeft`` (alpha x std of the tensor, ComPEFT).
        alpha: the ComPEFT scale's multiplier (``scale: compeft`` only).
        error_feedback: keep what was not sent in the client's state and add it to the
            next round's update.
        downlink: also compress the server -> client adapters, as the change against what
            that client last received.
    """

    density: float | None = None
    scale: Literal["compeft", "stc"] = "stc"
    alpha: float = 1.0
    error_feedback: bool = True
    downlink: bool = False


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy (:mod:`fedpeft.privacy`); ``mode: none`` by default.

    Args:
        mode: ``none``; ``record`` (DP-SGD with Opacus on each client: per-example
            clipping to ``clip_norm``, ε per client over all its rounds); ``user``
            (DP-FedAvg: each client's update clipped to ``clip_norm``, Gaussian noise on
            the server's sum, ε per round of sampling); ``local`` (each client clips and
            adds the noise itself before sending, for an untrusted server).
        epsilon: the privacy budget ε, in (0, 100] (``prv``: at most 20). Without
            ``noise_multiplier`` the noise is computed up front to spend exactly it over
            the configured rounds; with one, it caps the run (``user``: the run stops
            after the last affordable round).
        delta: δ of (ε, δ)-DP, in (0, 0.1] (``prv``: at least 1e-10).
        noise_multiplier: z, the noise std over the clipping norm, in [0.1, 1e6];
            ``null``: from ε.
        clip_norm: C, the clipping norm (per example for ``record``, per update otherwise).
        accountant: Opacus accountant, ``rdp`` or ``prv`` (tighter, but slow: at most
            10^4 accounted steps, i.e. rounds, times ``train.local_steps`` for ``record``).
        noise_seed: seed of the DP noise (and of ``record``'s Poisson batches), for
            reproducible experiments only (noise anyone can regenerate protects
            nothing), in [0, 2**32); ``null``: OS entropy.
        canaries: ``user`` only: this many canary clients (random updates of norm C)
            join DP-FedAvg's sum, and the run ends with an empirical ε from how visible
            they are in the final model (fedpeft.audit.membership). They perturb the
            model: an audit run, not a production one.
    """

    mode: Literal["none", "record", "user", "local"] = "none"
    epsilon: float | None = None
    delta: float = 1e-5
    noise_multiplier: float | None = None
    clip_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    noise_seed: int | None = None
    canaries: int = 0


@dataclass(frozen=True)
class SimulationConfig:
    """Where ``fedpeft simulate`` runs the virtual clients.

    Args:
        runtime: ``ray``, Flower's simulation runtime: each client in a Ray actor,
            cores / client_cpus of them at once. ``inprocess``: the ServerApp and every
            ClientApp in the calling process, one message at a time, through real Flower
            messages serialized on each hop (:mod:`fedpeft.loopback`); no Ray, no
            parallel clients, seconds with a tiny model, and a debugger sees both sides.
        client_cpus: CPU cores given to each virtual client; cores / client_cpus clients
            train at once, each with that many torch threads.
        ray_address: an existing Ray cluster to run the virtual clients on: its head's
            ``host:port`` (as ``ray start --head`` prints it) or ``auto``. Null: a
            private Ray instance on this machine's cores.
        client_gpus: GPUs given to each virtual client (Flower's ``num_gpus``; 0.5: two
            clients share one). With 0, Ray hides the GPUs from the clients and
            ``train.device: auto`` trains on the CPU.
    """

    runtime: str = "ray"
    client_cpus: float = 2.0
    ray_address: str | None = None
    client_gpus: float = 0.0


@dataclass(frozen=True)
class AuditConfig:
    """The gradient-inversion audit (``fedpeft audit CONFIG``).

    Args:
        attacks: attack names from :data:`fedpeft.audit.ATTACKS`.
        batch_sizes: examples in one client's round.
        settings: ``fedsgd`` (one step on the batch) and/or ``fedavg``
            (``train.local_steps`` steps on it, the protocol fedpeft runs).
        trials: batches per (setting, batch size); every defense sees the same ones.
        candidates: sentences in the public retrieval pool besides the clients' own.
        warmup_steps: AdamW steps on public examples that make the sent adapters those
            of a later round (B ≠ 0, which the span test needs); 0 audits round 1.
        defenses: name -> config overrides (a nested mapping, e.g. ``{privacy: {mode:
            local, noise_multiplier: 1.0}}``) applied on top of this config.
        tap_every: in ``fedpeft simulate``, run the attacks on every accepted update
            every this many rounds and log their scores in ``metrics.jsonl`` (0: off).
    """

    attacks: tuple[str, ...] = ("labels", "head_input", "token_set", "span", "span_b")
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    settings: tuple[str, ...] = ("fedsgd", "fedavg")
    trials: int = 3
    candidates: int = 200
    warmup_steps: int = 20
    defenses: dict[str, dict[str, Any]] = field(default_factory=lambda: {"none": {}})
    tap_every: int = 0

    def __hash__(self) -> int:  # defenses is a dict; hash its canonical JSON
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))


@dataclass(frozen=True)
class EvalConfig:
    """What evaluation of a ``causal_lm`` run generates (greedy decoding).

    Args:
        max_new_tokens: tokens generated per held-out prompt; an answer longer than
            this is cut and so scored wrong.
        generate_examples: held-out prompts answered per evaluation (the first ones; the
            token loss covers them all); 0 skips generation.
        samples: prompt / reference / generation triples written to ``samples.jsonl``
            per evaluated round.
    """

    max_new_tokens: int = 16
    generate_examples: int = 200
    samples: int = 3


@dataclass(frozen=True)
class Config:
    """A whole run. ``seed`` (in [0, 2**32)) controls partitioning, initialization and
    sampling."""

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    lora_sb: LoraSBConfig = field(default_factory=LoraSBConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"Config file '{path}' is not UTF-8 text.") from err
    except yaml.YAMLError as err:
        raise ConfigError(
            f"Config file '{path}' is not valid YAML ({_yaml_problem(err)})."
        ) from err
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections.")
    for item in overrides:
        apply_override(raw, item)
    return _absolute_paths(config_from_dict(raw))


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None) or "syntax error"
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}" if mark is not None else str(problem)


def _absolute(path: str | None) -> str | None:
    if path is None or path == "synthetic" or path.startswith("hf:"):
        return path
    return str(Path(path).expanduser().absolute())


def _absolute_paths(cfg: Config) -> Config:
    """Resolve file paths against the directory the run starts from, so that clients in
    other working directories (Ray actors, ``flwr run``) read the same files."""
    data = dataclasses.replace(
        cfg.data,
        source=_absolute(cfg.data.source) or "",
        test_source=_absolute(cfg.data.test_source),
    )
    fleet = dataclasses.replace(
        cfg.fleet, profiles=tuple(_absolute(p) or "" for p in cfg.fleet.profiles)
    )
    model = cfg.model
    if Path(model.name).expanduser().exists():
        model = dataclasses.replace(model, name=_absolute(model.name) or model.name)
    return dataclasses.replace(cfg, data=data, fleet=fleet, model=model)


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    cfg: Config = _build(Config, raw, "")
    _validate(cfg)
    return cfg


def config_from_json(text: str) -> Config:
    return config_from_dict(json.loads(text))


def lora_to_json(lora: LoraConfig) -> str:
    return json.dumps(dataclasses.asdict(lora), sort_keys=True)


def lora_from_json(text: str) -> LoraConfig:
    lora: LoraConfig = _build(LoraConfig, json.loads(text), "lora")
    _check_lora(lora)
    return lora


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"Override '{item}' should look like section.key=value.")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Override '{item}': '{part}' is not a section.")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"Override '{item}' has a value that is not valid YAML ({_yaml_problem(err)})."
        ) from err


def _build(cls: type[Any], raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{where or 'config'}' should be a mapping of keys.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"Unknown config key '{key}'; expected one of {sorted(names)}.")
    values = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key)
        else:
            values[name] = _coerce(value, hint, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint; ints are accepted where floats are."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is types.UnionType or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{key}' should be one of {list(args)}, got {value!r}.")
        return value
    if origin is tuple:  # YAML lists become tuples, so configs stay hashable
        if not isinstance(value, list | tuple):
            raise ConfigError(f"'{key}' should be a list, got {value!r}.")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' should be a mapping, got {value!r}.")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, hint, key)


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is Any:  # free-form (audit defenses: checked when applied)
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return _finite(float(value), key)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-4" as a string
            number = float(value)
        except ValueError:
            pass
        else:
            return _finite(number, key)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise ConfigError(f"'{key}' should be {hint.__name__}, got {value!r}.")


def _finite(value: float, key: str) -> float:
    """Every float of a config is finite: inf passes every 'positive' rule below and nan
    every comparison a section does not happen to make (``.inf``/``.nan`` are YAML)."""
    if not math.isfinite(value):
        raise ConfigError(f"'{key}' should be a finite number, got {value}.")
    return value


# --------------------------------------------------------------------------- rules


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_model(m: ModelConfig) -> None:
    _require(m.max_length >= 8, "'model.max_length' should be at least 8.")
    _require(
        m.dropout is None or 0 <= m.dropout < 1, "'model.dropout' should be in [0, 1) or null."
    )
    _require(
        m.pooling == "cls" or m.task == "classification",
        "'model.pooling: mean' applies to classification only.",
    )


LORA_SCALINGS = ("standard", "rslora", "fixed")
OPTIMIZERS = ("adamw", "sgd")
DEVICE_CHOICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def _check_lora(lo: LoraConfig) -> None:
    _require(lo.r >= 1, "'lora.r' should be a positive integer.")
    _require(0 < lo.alpha < float("inf"), "'lora.alpha' should be a positive number.")
    _require(
        lo.scaling in LORA_SCALINGS,
        f"'lora.scaling' should be one of {list(LORA_SCALINGS)}, got {lo.scaling!r}.",
    )
    _require(
        lo.target_modules is None or len(lo.target_modules) > 0,
        "'lora.target_modules' should list module names, or be null for the model's default.",
    )
    _require(0.0 <= lo.dropout < 1.0, "'lora.dropout' should be in [0, 1).")
    _require(
        all(v >= 1 for v in lo.rank_pattern.values()),
        "'lora.rank_pattern' ranks should be positive integers.",
    )
    _require(
        lo.layers_to_transform is None or all(i >= 0 for i in lo.layers_to_transform),
        "'lora.layers_to_transform' should list non-negative layer indices.",
    )


PEFT_METHODS = ("lora", "lora_sb", "sparse")
SPARSE_SELECTIONS = ("sam", "magnitude", "random")
LORA_SB_INITS = ("gradient", "weights")
# aggregators that average each exchanged tensor entry by entry; the others read LoRA's
# A and B factors, which LoRA-SB does not send
LORA_SB_AGGREGATORS = ("fedit", "median", "trimmed_mean")


def _check_method(cfg: Config) -> None:
    method, sb = cfg.peft.method, cfg.lora_sb
    _require(
        method in PEFT_METHODS,
        f"'peft.method' should be one of {list(PEFT_METHODS)}, got {method!r}.",
    )
    _require(
        sb.init in LORA_SB_INITS,
        f"'lora_sb.init' should be one of {list(LORA_SB_INITS)}, got {sb.init!r}.",
    )
    _check_burnin("lora_sb", sb.burnin_steps, sb.score_density)
    _require(
        sb.init_lr is None or 0 < sb.init_lr < float("inf"),
        "'lora_sb.init_lr' should be a positive number or null.",
    )
    _check_sparse(cfg.sparse)
    if method == "lora":
        return
    _require(
        cfg.federation.aggregator in LORA_SB_AGGREGATORS,
        f"'peft.method: {method}' exchanges no LoRA factors; use one of "
        f"{list(LORA_SB_AGGREGATORS)} as 'federation.aggregator', not "
        f"{cfg.federation.aggregator!r}.",
    )
    _require(
        not cfg.lora.rank_pattern and cfg.lora.layers_to_transform is None,
        f"'peft.method: {method}' trains the same structure on every target module; drop "
        "'lora.rank_pattern' and 'lora.layers_to_transform'.",
    )
    _require(
        not cfg.fleet.profiles and not cfg.fleet.mix,
        f"'peft.method: {method}' does not plan per-device structures yet; drop 'fleet'.",
    )
    _require(
        cfg.privacy.mode not in ("record",),
        f"'peft.method: {method}' with 'privacy.mode: record' is not supported yet; "
        "use 'user' or 'local'.",
    )
    _require(
        not cfg.model.load_in_4bit,
        f"'peft.method: {method}' is not built for a 4-bit base ('model.load_in_4bit').",
    )
    # a burn-in releases each node's summed gradient, which no accountant covers
    burn_in = {"sparse": cfg.sparse.selection == "sam", "lora_sb": sb.init == "gradient"}
    data_free = {
        "sparse": "'sparse.selection: magnitude' or 'random'",
        "lora_sb": "'lora_sb.init: weights'",
    }
    _require(
        cfg.privacy.mode == "none" or not burn_in[method],
        f"The burn-in of 'peft.method: {method}' releases each node's summed gradient "
        f"outside the privacy accountant; under DP use {data_free[method]}.",
    )
    _require(
        not cfg.audit.tap_every,
        f"'audit.tap_every' attacks LoRA updates; it does not apply to 'peft.method: {method}'.",
    )


def _check_burnin(section: str, steps: int, score_density: float) -> None:
    _require(steps >= 1, f"'{section}.burnin_steps' should be a positive integer.")
    _require(0 < score_density <= 1, f"'{section}.score_density' should be in (0, 1].")


def _check_sparse(sp: SparseConfig) -> None:
    _require(0 < sp.density < 1, "'sparse.density' should be in (0, 1).")
    _require(
        sp.selection in SPARSE_SELECTIONS,
        f"'sparse.selection' should be one of {list(SPARSE_SELECTIONS)}, got {sp.selection!r}.",
    )
    _check_burnin("sparse", sp.burnin_steps, sp.score_density)
    _require(
        sp.targets is None or len(sp.targets) > 0,
        "'sparse.targets' should list module names, or be null for the model's default.",
    )


def _check_data(d: DataConfig) -> None:
    _require(0.0 < d.test_fraction < 1.0, "'data.test_fraction' should be in (0, 1).")
    _require(d.synthetic_samples >= 20, "'data.synthetic_samples' should be at least 20.")
    _require(d.synthetic_classes >= 2, "'data.synthetic_classes' should be at least 2.")
    for key in ("max_train_samples", "max_test_samples"):
        cap = getattr(d, key)
        _require(cap is None or cap >= 1, f"'data.{key}' should be positive or null.")
    _require(
        d.prompt is None or "{text}" in d.prompt,
        "'data.prompt' should contain {text}, where each row's text goes.",
    )
    _require(
        d.label_words is None or d.prompt is not None,
        "'data.label_words' applies with 'data.prompt' only.",
    )
    _require(
        d.label_words is None or all(w.strip() for w in d.label_words),
        "'data.label_words' should be non-empty words.",
    )
    _require(
        d.prompt is None or d.format in ("auto", "text"),
        f"'data.prompt' turns labelled text rows into instructions; 'data.format: "
        f"{d.format}' rows are instructions already.",
    )


def _check_eval(e: EvalConfig) -> None:
    _require(1 <= e.max_new_tokens <= 4096, "'eval.max_new_tokens' should be in [1, 4096].")
    _require(e.generate_examples >= 0, "'eval.generate_examples' should be non-negative.")
    _require(e.samples >= 0, "'eval.samples' should be non-negative.")


def _check_partition(p: PartitionConfig) -> None:
    _require(p.num_clients >= 1, "'partition.num_clients' should be at least 1.")
    _require(p.alpha > 0, "'partition.alpha' should be positive.")
    _require(p.shards_per_client >= 1, "'partition.shards_per_client' should be at least 1.")
    _require(
        0.0 <= p.client_test_fraction < 1.0,
        "'partition.client_test_fraction' should be in [0, 1).",
    )


def _check_train(t: TrainConfig) -> None:
    _require(t.local_steps >= 1, "'train.local_steps' should be at least 1.")
    _require(t.batch_size >= 1, "'train.batch_size' should be at least 1.")
    _require(t.lr > 0, "'train.lr' should be positive.")
    _require(t.weight_decay >= 0, "'train.weight_decay' should be non-negative.")
    _require(t.logit_adjustment >= 0, "'train.logit_adjustment' should be non-negative.")
    _require(
        t.optimizer in OPTIMIZERS,
        f"'train.optimizer' should be one of {', '.join(OPTIMIZERS)}, got '{t.optimizer}'.",
    )
    _require(0 <= t.momentum < 1, "'train.momentum' should be in [0, 1).")
    _require(
        t.momentum == 0 or t.optimizer == "sgd",
        "'train.momentum' applies to 'train.optimizer: sgd' only.",
    )
    _require(t.adam_eps > 0, "'train.adam_eps' should be positive.")
    _require(
        DEVICE_CHOICE.fullmatch(t.device) is not None,
        f"'train.device' should be auto, cpu, cuda, cuda:N or mps, got {t.device!r}.",
    )


def _check_federation(f: FederationConfig, num_clients: int) -> None:
    from fedpeft.aggregation import AGGREGATORS
    from fedpeft.aggregation.serveropt import MOMENTUM_AGGREGATORS
    from fedpeft.aggregation.serveropt import OPTIMIZERS as SERVER_OPTIMIZERS

    _require(f.rounds >= 1, "'federation.rounds' should be at least 1.")
    _require(0.0 < f.fraction_train <= 1.0, "'federation.fraction_train' should be in (0, 1].")
    _require(
        1 <= f.min_clients <= num_clients,
        f"'federation.min_clients' should be between 1 and partition.num_clients ({num_clients}).",
    )
    _require(
        f.aggregator in AGGREGATORS,
        f"'federation.aggregator' should be one of {sorted(AGGREGATORS)}, got {f.aggregator!r}.",
    )
    _require(0 < f.server_lr < float("inf"), "'federation.server_lr' should be a positive number.")
    _require(
        f.server_optimizer in SERVER_OPTIMIZERS,
        f"'federation.server_optimizer' should be one of {', '.join(SERVER_OPTIMIZERS)}, "
        f"not {f.server_optimizer!r}.",
    )
    _require(
        f.server_optimizer == "sgd" or f.aggregator in MOMENTUM_AGGREGATORS,
        f"'federation.server_optimizer: {f.server_optimizer}' keeps a buffer per factor, which "
        f"needs an aggregator that keeps the factors' basis ({', '.join(MOMENTUM_AGGREGATORS)}); "
        f"'{f.aggregator}' re-factorizes or restarts them every round.",
    )
    _require(0 <= f.server_momentum < 1, "'federation.server_momentum' should be in [0, 1).")
    _require(0 <= f.server_beta2 < 1, "'federation.server_beta2' should be in [0, 1).")
    _require(0 < f.server_tau < float("inf"), "'federation.server_tau' should be positive.")
    _require(f.eval_batch_size >= 1, "'federation.eval_batch_size' should be at least 1.")
    _require(f.timeout > 0, "'federation.timeout' should be positive.")
    _require(
        f.max_update_norm is None or 0 < f.max_update_norm < float("inf"),
        "'federation.max_update_norm' should be a positive number or null.",
    )


def _check_fleet(f: FleetConfig, num_clients: int) -> None:
    _require(f.max_rank >= 1, "'fleet.max_rank' should be a positive integer.")
    _require(bool(f.mix) == bool(f.profiles), "'fleet.profiles' and 'fleet.mix' go together.")
    _require(all(n >= 0 for n in f.mix.values()), "'fleet.mix' counts should be non-negative.")
    _require(
        f.assign == "shuffled" or bool(f.mix),
        f"'fleet.assign: {f.assign}' assigns the devices of 'fleet.mix', which is empty.",
    )
    if f.mix:
        _require(
            sum(f.mix.values()) == num_clients,
            f"'fleet.mix' counts should add up to partition.num_clients ({num_clients}).",
        )


def _check_compression(c: CompressionConfig) -> None:
    _require(
        c.density is None or 0.0 < c.density <= 1.0,
        "'compression.density' should be in (0, 1], or null for fp32 updates.",
    )
    _require(0 < c.alpha < float("inf"), "'compression.alpha' should be a positive number.")
    _require(
        c.density is not None or not c.downlink,
        "'compression.downlink' needs 'compression.density'.",
    )
    _require(
        c.scale == "stc" or c.alpha <= 1 or not (c.error_feedback or c.downlink),
        "'compression.alpha' above 1 with error feedback or downlink compression can grow "
        "the error instead of shrinking it; use alpha <= 1 or 'scale: stc'.",
    )


# The accepted budgets. ε: Ponomareva et al. (2023, "How to DP-fy ML") call ε <= 10 a
# reasonable guarantee and above it few formal protections remain; deployments stay
# below ~20. 100 leaves experiments room (tests run up to 50); past it e^ε > 10^43.
# The RDP search for z takes at most ~7 s anywhere in this range (PRV: see
# _check_accountant). δ: the chance the guarantee fails outright; it should be well
# below 1 / n, and above 0.1 it is no guarantee (PRV cannot compute ε at δ ~ 1 at all).
# z: Opacus's RDP series never ends near z = 1e-155 and overflows near 1e155, and PRV
# fails at 0.01; local DP accounts z / 2, which stays >= accounting.MIN_NOISE (0.05).
MAX_EPSILON = 100.0
MAX_DELTA = 0.1
NOISE_RANGE = (0.1, 1e6)


def _check_privacy(cfg: Config) -> None:
    p = cfg.privacy
    _require(p.canaries >= 0, "'privacy.canaries' should be non-negative.")
    _require(
        p.canaries == 0 or p.mode == "user",
        "'privacy.canaries' audits user-level DP; it needs 'privacy.mode: user'.",
    )
    if p.mode == "none":
        return
    _require(
        p.epsilon is not None or p.noise_multiplier is not None,
        f"'privacy.mode: {p.mode}' needs 'privacy.epsilon' or 'privacy.noise_multiplier'.",
    )
    _require(
        p.epsilon is None or 0 < p.epsilon <= MAX_EPSILON,
        f"'privacy.epsilon' should be in (0, {MAX_EPSILON:g}]: beyond that one record or "
        "user may change the odds of any outcome e^ε-fold, which protects nothing.",
    )
    _require(
        0 < p.delta <= MAX_DELTA,
        f"'privacy.delta' should be in (0, {MAX_DELTA:g}]: δ is the chance the guarantee "
        "fails outright, kept well below 1 / the records or users protected (1e-5 is usual).",
    )
    _require(
        p.noise_multiplier is None or NOISE_RANGE[0] <= p.noise_multiplier <= NOISE_RANGE[1],
        "'privacy.noise_multiplier' should be in [0.1, 1e6]: below 0.1 one step at q = 1 "
        "spends ε ≈ 90 or more, and Opacus's accountants fail far outside this range.",
    )
    _check_accountant(cfg)
    _require(0 < p.clip_norm < float("inf"), "'privacy.clip_norm' should be a positive number.")
    _check_seed(p.noise_seed, "privacy.noise_seed", nullable=True)
    _require(
        not cfg.federation.client_eval,
        "'federation.client_eval' reports unprotected client metrics; turn it off under DP.",
    )
    if p.mode == "record":
        _require(
            cfg.train.logit_adjustment == 0,
            "'privacy.mode: record' needs 'train.logit_adjustment: 0' (the logit-adjusted "
            "loss uses the client's label counts, which DP-SGD does not protect).",
        )
        _require(
            not cfg.train.gradient_checkpointing,
            "'privacy.mode: record' needs 'train.gradient_checkpointing: false' (Opacus gets "
            "no per-example gradients of the adapters in recomputed layers).",
        )
    if p.mode == "user":
        _require(
            cfg.federation.aggregator == "fedit" and not cfg.fleet.profiles,
            "'privacy.mode: user' needs 'federation.aggregator: fedit' and one LoRA shape for "
            "all clients (no 'fleet'): DP-FedAvg noises one uniform average.",
        )
    if p.mode in ("user", "local") and p.epsilon is not None:
        _check_budget(cfg)


def _check_accountant(cfg: Config) -> None:
    """What Opacus's PRV accountant computes in reasonable time (RDP takes any steps and
    δ): its mesh grows with ε and the steps, and its floating-point error with 1 / δ."""
    p, fed = cfg.privacy, cfg.federation
    if p.accountant != "prv":
        return
    from fedpeft.privacy.accounting import PRV_MAX_EPSILON, PRV_MAX_STEPS, PRV_MIN_DELTA

    _require(
        p.epsilon is None or p.epsilon <= PRV_MAX_EPSILON,
        f"'privacy.accountant: prv' takes minutes to search a noise multiplier above ε = "
        f"{PRV_MAX_EPSILON:g} (its mesh grows with ε); use 'rdp' there.",
    )
    _require(
        p.delta >= PRV_MIN_DELTA,
        f"'privacy.accountant: prv' cannot compute ε below δ = {PRV_MIN_DELTA:g} (its "
        f"floating-point error exceeds δ); use 'rdp' or a larger 'privacy.delta'.",
    )
    per_round = cfg.train.local_steps if p.mode == "record" else 1
    steps = fed.rounds * per_round
    what = "federation.rounds × train.local_steps" if p.mode == "record" else "federation.rounds"
    _require(
        steps <= PRV_MAX_STEPS,
        f"'privacy.accountant: prv' takes minutes per ε beyond {PRV_MAX_STEPS} accounted "
        f"steps and this run has {steps} ({what}); use 'rdp' or fewer steps.",
    )


def _check_budget(cfg: Config) -> None:
    """The budget must afford at least one round (Opacus cannot find a z for less)."""
    from fedpeft.privacy.accounting import Entry, epsilon, noise_for_budget

    p, fed, n = cfg.privacy, cfg.federation, cfg.partition.num_clients
    q = fed.sampled(n) / n if p.mode == "user" else 1.0
    z = p.noise_multiplier
    if p.mode == "local" and z is not None:
        z = z / 2  # two clipped updates can be 2C apart
    assert p.epsilon is not None
    if z is None:
        try:
            noise_for_budget(p.epsilon, p.delta, q, fed.rounds, p.accountant)
        except ValueError:
            raise ConfigError(
                f"'privacy.epsilon' {p.epsilon:g} is too small for {fed.rounds} rounds at "
                f"δ = {p.delta:g}; raise it or lower 'federation.rounds'."
            ) from None
        return
    first = epsilon([Entry(z, q, 1)], p.delta, p.accountant)
    _require(
        first <= p.epsilon,
        f"'privacy.epsilon' {p.epsilon:g} does not afford one round at noise multiplier "
        f"{p.noise_multiplier:g} (one round spends ε = {first:.3g}).",
    )


AUDIT_SETTINGS = ("fedsgd", "fedavg")


def _check_audit(a: AuditConfig) -> None:
    _require(
        all(b >= 1 for b in a.batch_sizes) and bool(a.batch_sizes),
        "'audit.batch_sizes' should list positive integers.",
    )
    _require(
        bool(a.settings) and all(x in AUDIT_SETTINGS for x in a.settings),
        f"'audit.settings' should list some of {', '.join(AUDIT_SETTINGS)}.",
    )
    _require(a.trials >= 1, "'audit.trials' should be at least 1.")
    _require(a.candidates >= 0, "'audit.candidates' should be non-negative.")
    _require(a.warmup_steps >= 0, "'audit.warmup_steps' should be non-negative.")
    _require(bool(a.defenses), "'audit.defenses' should name at least one defense.")
    _require(a.tap_every >= 0, "'audit.tap_every' should be non-negative (0: no tap).")


RUNTIMES = ("ray", "inprocess")


def _check_simulation(s: SimulationConfig) -> None:
    _require(
        s.runtime in RUNTIMES,
        f"'simulation.runtime' should be one of {', '.join(RUNTIMES)}, not '{s.runtime}'.",
    )
    _require(
        s.ray_address is None or s.runtime == "ray",
        "'simulation.ray_address' needs 'simulation.runtime: ray'.",
    )
    _require(s.client_cpus > 0, "'simulation.client_cpus' should be positive.")
    _require(s.client_gpus >= 0, "'simulation.client_gpus' should be non-negative.")
    _require(
        s.ray_address is None or bool(s.ray_address.strip()),
        "'simulation.ray_address' should be a Ray head's host:port, 'auto', or null.",
    )


# torch.manual_seed takes < 2**64, numpy's default_rng and random.Random any size; 2**32
# is what every seeding API accepts (numpy's legacy RandomState too) and leaves room for
# the derived seeds: seed + 7919 (canaries), seed * 7919 + client (random.Random),
# [seed, round] (default_rng) and round_seed's (...) % 2**31 (torch)
SEED_LIMIT = 2**32


def _check_seed(seed: int | None, key: str, nullable: bool = False) -> None:
    _require(
        (seed is None and nullable) or (seed is not None and 0 <= seed < SEED_LIMIT),
        f"'{key}' should be an integer from 0 to 2**32 - 1 ({SEED_LIMIT - 1})"
        + (", or null." if nullable else "."),
    )


def _validate(cfg: Config) -> None:
    _check_seed(cfg.seed, "seed")
    _check_model(cfg.model)
    _check_lora(cfg.lora)
    _check_method(cfg)
    _check_data(cfg.data)
    _check_partition(cfg.partition)
    _check_train(cfg.train)
    _check_federation(cfg.federation, cfg.partition.num_clients)
    _check_fleet(cfg.fleet, cfg.partition.num_clients)
    _check_compression(cfg.compression)
    _check_privacy(cfg)
    _require(
        not (cfg.compression.downlink and cfg.federation.aggregator == "flora"),
        "'compression.downlink' does not apply to 'flora': its adapters restart every round "
        "and its merged updates are sent in full.",
    )
    _check_simulation(cfg.simulation)
    _check_audit(cfg.audit)
    _check_eval(cfg.eval)
    _require(
        not (cfg.model.load_in_4bit and cfg.federation.aggregator == "flora"),
        "'federation.aggregator: flora' merges updates into the base weights, which a "
        "4-bit base ('model.load_in_4bit') cannot hold; use another aggregator.",
    )
    _require(
        not (cfg.train.precision == "fp16" and cfg.privacy.mode == "record"),
        "'train.precision: fp16' scales the loss, which Opacus's per-example clipping "
        "would clip at the wrong norm; use bf16 or fp32 with 'privacy.mode: record'.",
    )
    _require(
        cfg.model.task == "causal_lm" or (cfg.data.prompt is None and cfg.data.format == "auto"),
        "'data.prompt' and 'data.format' shape causal-LM rows; set 'model.task: causal_lm'.",
    )
