"""Record-level (example-level) DP-SGD on a client's adapters, with Opacus.

DP-SGD (Abadi et al., 2016, "Deep Learning with Differential Privacy", Alg. 1): Poisson-
sampled batches at rate q = B / n, each example's gradient clipped to norm C, Gaussian
noise N(0, (zC)²) added to the sum, then the optimizer step. Opacus does all of it: its
DataLoader samples, its hooks compute per-example gradients of the trainable (adapter and
head) parameters only, its optimizer clips and noises, and its accountant records each
step. The accountant's history is passed in and returned, so a node's ε composes over
all its rounds.

Seen with Opacus 1.6 and peft: ``from_pretrained`` leaves the head in eval mode, and
Opacus captures activations only of modules in training mode, so ``model.train()`` must
come before ``make_private`` (docs/architecture.md, known traps; ``tests/test_privacy.py`` pins it
and checks the adapters really change).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedpeft.config import TrainConfig
from fedpeft.privacy.accounting import AccountantName, Entry
from fedpeft.train import Encoded, TrainResult, collate, forward_loss, make_optimizer


class _Indices(Dataset[tuple[torch.Tensor]]):
    """Example indices, as 1-tuples (Opacus's loader expects a tuple per sample); batches
    are collated from them with dynamic padding."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (torch.tensor(i),)


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus's q for a loader of this size: 1 / (number of batches per epoch)."""
    return 1.0 / len(range(0, num_examples, batch_size))


def train_local_dp(
    model: torch.nn.Module,
    data: Encoded,
    train: TrainConfig,
    *,
    noise_multiplier: float,
    clip_norm: float,
    pad_id: int,
    task: str,
    seed: int | None,
    history: list[Entry],
    accountant: AccountantName = "rdp",
) -> tuple[TrainResult, list[Entry]]:
    """``train.local_steps`` DP-SGD steps of ``train.batch_size`` expected examples with
    Opacus's privatized ``train.optimizer`` (adamw with its ε, or sgd) on the trainable
    parameters; returns the result and the accountant's history after them."""
    steps, batch_size = train.local_steps, train.batch_size
    if len(data) == 0:
        raise ValueError("A client with no training examples cannot train.")
    start = time.perf_counter()
    # Opacus draws the Poisson batches and the noise from torch's global generator
    # (outside its secure mode), so a seed the server knows would let it replay both:
    # OS entropy unless the run asks for reproducible noise (privacy.noise_seed)
    if seed is None:
        torch.seed()
    else:
        torch.manual_seed(seed)
    # imported here: Opacus imports scipy.stats (about 1 s), which a ClientApp process
    # that does not train with DP-SGD never needs
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=accountant)
    engine.accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]
    loader = DataLoader(_Indices(len(data)), batch_size=batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()  # before make_private: Opacus hooks only modules in training mode
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=make_optimizer(params, train),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip_norm,
        poisson_sampling=True,
        wrap_model=False,
    )
    q = sample_rate(len(data), batch_size)
    losses: list[float] = []
    done = 0
    try:
        while done < steps:
            for (index,) in dp_loader:
                if done == steps:
                    break
                done += 1
                if len(index) == 0:  # an empty Poisson batch: no step, but it is counted
                    engine.accountant.step(noise_multiplier=noise_multiplier, sample_rate=q)
                    continue
                batch = collate(data, index.tolist(), pad_id, task)
                device = next(model.parameters()).device
                batch = {k: v.to(device) for k, v in batch.items()}
                loss, _ = forward_loss(model, batch, task)
                dp_optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                dp_optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        hooks.cleanup()  # the cached model serves the next round without Opacus hooks
        model.eval()
    result = TrainResult(
        loss=float(np.mean(losses)) if losses else 0.0,
        # the weight it reports is data-independent: the sampled batch sizes would reveal n
        num_examples=steps * batch_size,
        steps=done,
        seconds=time.perf_counter() - start,
    )
    return result, [Entry(float(z), float(r), int(s)) for z, r, s in engine.accountant.history]
