"""The one seam between `label` and the rest of minirlhf: checkpoints, sampling and the
preference file format. Everything else in minirlhf/label/ is plain stdlib.

    DataError, read_prompts(path), read_preferences(path)      file formats (minirlhf.data)
    check_checkpoint(dir), check_device(name)                   ValueError unless usable
    sample(ckpt_dir, prompts, n=K, ...) -> [[str] * K per prompt]
"""
from __future__ import annotations

from ..checkpoint import fsync
from ..data import DataError, read_preferences, read_prompts

__all__ = ["DataError", "check_checkpoint", "check_device", "fsync", "read_preferences", "read_prompts", "sample"]


def check_device(name: str) -> None:
    """Raise ValueError for a device this machine lacks (--device cuda without CUDA)."""
    from ..device import resolve_device

    resolve_device(name)


def check_checkpoint(path) -> None:
    """Raise ValueError unless `path` holds a finished checkpoint of any stage (cheap: reads config.json)."""
    from .. import checkpoint

    if not checkpoint.is_finished(path):
        raise ValueError(f"{path}: no finished checkpoint here (a stage directory such as runs/quick/sft)")


def sample(ckpt_dir, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float, batch_size: int,
           seed: int, device: str = "auto") -> list[list[str]]:
    """n responses (decoded text) per prompt from the checkpoint's model, with its chat framing;
    the same seed gives the same texts on the same device."""
    from .. import checkpoint
    from ..device import resolve_device
    from ..generate import sample_responses

    dev = resolve_device(device)
    tokenizer = checkpoint.load_tokenizer(ckpt_dir)
    model = checkpoint.load_model_from(ckpt_dir, device=dev)
    return sample_responses(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                            batch_size=batch_size, seed=seed, desc=f"[label] sampling {ckpt_dir}")
