"""Measured memory of one real training step, tensor by tensor.

Autograd's saved-tensor hooks see every activation kept for backward; parameters,
gradients and AdamW state are read off after a real optimizer step. Storages are counted
once each, so views and shared tensors do not double count. This is the allocation the
step needs; allocator caching and temporary workspaces come on top.
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.train import forward_loss


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def measure_step_memory(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], lr: float = 1e-3
) -> dict[str, int]:
    """Bytes of weights, saved activations, gradients and optimizer state of one step."""
    params = list(model.parameters())
    param_storages = {_storage_key(p) for p in params}
    saved: set[tuple[int, int]] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in param_storages:
            saved.add(key)
        return t

    model.train()
    trainable = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # what training computes (a causal LM's logits only where a target follows)
        task = "classification" if batch["labels"].dim() == 1 else "causal_lm"
        loss, _ = forward_loss(model, batch, task)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    state: list[Any] = [v for s in optimizer.state.values() for v in s.values()]
    model.eval()
    return {
        "weights": sum(n for _, n in param_storages),
        "activations": sum(n for _, n in saved),
        "gradients": sum(p.grad.nbytes for p in trainable if p.grad is not None),
        "optimizer": sum(t.nbytes for t in state if isinstance(t, torch.Tensor) and t.dim() > 0),
    }
