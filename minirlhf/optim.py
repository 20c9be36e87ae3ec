"""AdamW with decay on matrices only, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), *,
                   also: tuple[tuple[torch.nn.Module, float], ...] = ()):
    """AdamW over model's parameters at lr, and over each (other model, its lr) of `also` in
    the same optimizer (one step updates all of them; PPO's policy and critic).

    Weight decay applies to matrices (linear weights, embeddings), not to gains or biases
    (nanoGPT's split)."""
    groups = []
    for m, group_lr in ((model, lr), *also):
        params = [p for p in m.parameters() if p.requires_grad]
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": group_lr},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": group_lr}]
    # the fused implementation: one kernel over all parameters instead of a loop of small ops per tensor
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to peak·min_ratio at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def step(optimizer, models, loss, grad_clip: float | None):
    """Backward, clip gradient norms (None: no clipping), update; returns the pre-clip norm(s).

    models: one module, or a list of modules whose gradient norms are clipped each on its own
    (PPO's policy and critic: one backward and one optimizer step, two norms). loss: a scalar
    tensor, or {name: scalar tensor} summed (disjoint graphs give each model its own gradient).
    A non-finite loss or gradient norm raises NonFiniteError naming it, before the update, so
    the weights stay as they were (the stage stops and keeps its last good checkpoint)."""
    from .checkpoint import NonFiniteError

    losses = loss if isinstance(loss, dict) else {"loss": loss}
    for name, value in losses.items():
        if not torch.isfinite(value):
            raise NonFiniteError(f"{name} is {value.item()}")
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    norms = []
    for m in models if isinstance(models, (list, tuple)) else [models]:
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), grad_clip if grad_clip is not None else float("inf"))
        if not torch.isfinite(norm):
            raise NonFiniteError(f"gradient norm is {norm.item()}")
        norms.append(float(norm))
    optimizer.step()
    return norms if isinstance(models, (list, tuple)) else norms[0]
