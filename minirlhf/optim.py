"""AdamW with decay on matrices only, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    # decay matrices (linear weights, embeddings); not gains or biases (nanoGPT's split)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to peak·min_ratio at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def step(optimizer, models, loss: torch.Tensor, grad_clip: float | None) -> float:
    """Backward, clip the global gradient norm (None: no clipping), update; returns the pre-clip norm.

    models: one module or a list of them (their gradients are clipped together). A non-finite
    loss or gradient norm raises NonFiniteError before the update, so the weights stay as
    they were (the stage stops and keeps its last good checkpoint)."""
    from .checkpoint import NonFiniteError

    if not torch.isfinite(loss):
        raise NonFiniteError(f"loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for m in (models if isinstance(models, (list, tuple)) else [models]) for p in m.parameters()]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
    if not torch.isfinite(norm):
        raise NonFiniteError(f"gradient norm is {norm.item()}")
    optimizer.step()
    return float(norm)
