"""Optimization attack: find inputs whose adapter gradient matches the observed update.

TAG (Deng et al., 2021, "TAG: Gradient Attack on Transformer-based Language Models")
and LAMP (Balunović et al., 2022, "LAMP: Extracting Text from Gradients with Language
Model Priors") optimize dummy input embeddings Z so that the gradient they produce on
the exchanged parameters matches the observed one, then map each position to its
nearest token embedding. For fedAvg the attack simulates the client's local steps
(Geiping et al., 2020, §5): with ``train.optimizer: sgd`` it unrolls the S steps on the
dummy batch, differentiably, and compares θ_S − θ_0 with the observed update Δ over every
exchanged tensor the dummy inputs reach (LoRA factors, head); S = 1 is fedSGD. Momentum
is not modelled, and for Adam it compares one gradient step's direction. The objective is
LAMP's cosine distance per tensor, 1 − cos(Δ(Z, ŷ), Δ), with the labels ŷ from the
label attack. The
sentence length is not observed; the attack assumes ``length`` tokens per example (by
default the row-space dimension of the first-layer update per example when there is
one, else 16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from peft import get_peft_model_state_dict
from torch.func import functional_call

from fedpeft.audit.base import Guess, Public
from fedpeft.audit.labels import LabelLeak
from fedpeft.audit.threat import ServerView
from fedpeft.audit.tokens import first_layer_a, first_layer_keys, rounding_floor, row_space
from fedpeft.models import load_tokenizer


class GradientMatching:
    name = "optimization"

    def __init__(self, iterations: int = 200, lr: float = 0.05, length: int | None = None) -> None:
        self.iterations = iterations
        self.lr = lr
        self.length = length

    def unavailable(self, view: ServerView) -> str | None:
        if not any(".lora_" in k for k in view.update):
            return "no LoRA factors in the update"
        return None

    def run(self, view: ServerView, public: Public) -> Guess:
        result = self.match(view, public)
        tok = load_tokenizer(view.cfg.model.name)
        texts = tuple(str(tok.decode(row, skip_special_tokens=True)) for row in result.ids.tolist())
        tokens = frozenset(int(t) for t in result.ids.flatten().tolist())
        note = (
            f"length {result.ids.shape[1]} assumed; gradient cosine distance "
            f"{result.first:.3f} -> {result.final:.3f}"
        )
        return Guess(tokens=tokens, texts=texts, notes=(note,))

    def match(self, view: ServerView, public: Public) -> Match:
        """Optimize the dummy embeddings; the tokens nearest to them and the distance
        before and after."""
        model = view.global_model()
        # double backward: PyTorch's fused CPU attention has no second derivative
        model.get_base_model().set_attn_implementation("eager")  # type: ignore[operator]
        batch = view.cfg.train.batch_size
        target = torch.tensor(_labels(view, public))
        length = self.length or _length_guess(view, batch)
        params, keys = _exchanged_parameters(model)
        observed = _observed_direction(view, keys)
        table = model.get_input_embeddings().weight.detach()  # (V, n)
        generator = torch.Generator().manual_seed(0)
        z = torch.randn(batch, length, table.shape[1], generator=generator) * table.std()
        z.requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=self.lr)
        distances = []
        steps = view.cfg.train.local_steps if view.cfg.train.optimizer == "sgd" else 1
        for _ in range(self.iterations):
            # the update the dummy inputs would produce, kept differentiable in Z
            simulated = simulate_sgd(model, params, z, target, view.cfg.train.lr, steps)
            distance = gradient_distance(simulated, observed)
            optimizer.zero_grad()
            distance.backward(inputs=[z])  # type: ignore[no-untyped-call]
            optimizer.step()
            distances.append(float(distance))
        return Match(_nearest_tokens(z.detach(), table), distances[0], distances[-1])


@dataclass(frozen=True)
class Match:
    ids: torch.Tensor  # (B, L) nearest tokens
    first: float  # gradient distance at the random start
    final: float  # after the last iteration


def _labels(view: ServerView, public: Public) -> list[int]:
    leak = LabelLeak()
    if leak.unavailable(view) is None:
        guessed = leak.run(view, public).labels
        if guessed is not None:
            return list(guessed)
    return [0] * view.cfg.train.batch_size


def _length_guess(view: ServerView, batch: int) -> int:
    keys = first_layer_keys(view.update)
    if not keys:
        return 16
    dims = row_space(first_layer_a(view.update), rounding_floor([view.sent[k] for k in keys]))
    per_example = max(2, round(dims.shape[0] / batch))
    return int(min(per_example, view.cfg.model.max_length))


def _exchanged_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[str]]:
    """The trainable parameters and their exchanged (peft state dict) names, in order."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    exchanged = get_peft_model_state_dict(model, state_dict=dict(trainable))
    by_id = {id(p): p for p in trainable.values()}
    keys = [k for k, v in exchanged.items() if id(v) in by_id]
    return [by_id[id(exchanged[k])] for k in keys], keys


def _observed_direction(view: ServerView, keys: list[str]) -> list[torch.Tensor]:
    return [torch.from_numpy(view.update[k].astype(np.float32)) for k in keys]


def simulate_sgd(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    z: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    steps: int,
) -> list[torch.Tensor]:
    """θ_S − θ_0 after ``steps`` plain SGD steps on the dummy batch (all of it each step,
    as fedpeft's client does on a batch this size), differentiable in Z."""
    names = {id(p): n for n, p in model.named_parameters()}
    start = {names[id(p)]: p for p in params}
    current: dict[str, torch.Tensor] = dict(start)
    mask = torch.ones(z.shape[:2])
    for _ in range(steps):
        out = functional_call(
            model,
            current,
            args=(),
            kwargs={"inputs_embeds": z, "attention_mask": mask, "labels": labels},
        )
        grads = torch.autograd.grad(out.loss, list(current.values()), create_graph=True)
        current = {n: w - lr * g for (n, w), g in zip(current.items(), grads, strict=True)}
    return [current[n] - start[n] for n in start]


def gradient_distance(grads: list[torch.Tensor], observed: list[torch.Tensor]) -> torch.Tensor:
    """Mean over tensors of 1 − cos: one distance per tensor, so that the head (whose
    gradient dwarfs the LoRA factors') does not decide the match alone."""
    terms = [
        1 - torch.nn.functional.cosine_similarity(g.flatten(), o.flatten(), dim=0)
        for g, o in zip(grads, observed, strict=True)
        if float(o.abs().sum()) > 0
    ]
    return torch.stack(terms).mean()


def _nearest_tokens(z: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Each position's nearest token embedding by cosine."""
    z = torch.nn.functional.normalize(z, dim=-1)  # (B, L, n)
    t = torch.nn.functional.normalize(table, dim=-1)  # (V, n)
    return (z @ t.T).argmax(dim=-1)
