"""Device choice, mixed precision and seeding: the few lines every stage shares."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 on CPU, where bf16 matmuls are slower, not faster."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_all_cores() -> None:
    """torch's CPU threads: OMP_NUM_THREADS or every core in one process; under torchrun the cores
    this process may use divided by the processes on its node (distributed.cpu_threads), also for
    the C++ rollout buffer."""
    from . import distributed

    threads = distributed.cpu_threads(distributed.threads_option())
    torch.set_num_threads(threads)
    if distributed.launched():
        from . import rollout
        rollout.set_num_threads(threads)
