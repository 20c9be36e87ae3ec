"""The one seam between `label` and the rest of minirlhf: checkpoints, sampling and the
preference file format. Everything else in minirlhf/label/ is plain stdlib.

    DataError, read_prompts(path), read_responses(path, k_max), read_preferences(path),
    check_preference_line(path, line, text), rows(path), row_lines(path),
    show(value), json_type(value)                               file formats (minirlhf.data)
    check_checkpoint(dir) -> stage, check_device(name)          ValueError unless usable
    save_id(dir) -> str | None                                  the checkpoint save's random id
    prompt_lengths(dir, prompts) -> ([tokens], max_seq_len)     the stages' token budget, cheaply
    sample(ckpt_dir, prompts, n=K, ...) -> [[str] * K per prompt]
"""
from __future__ import annotations

from ..files import fsync
from ..data import DataError, read_preferences, read_prompts, read_responses, row_lines
from ..data.formats.jsonl import json_type, rows, show
from ..data.formats.readers import check_preference_line

__all__ = ["DataError", "check_checkpoint", "check_device", "check_preference_line", "fsync", "json_type",
           "prompt_lengths", "read_preferences", "read_prompts", "read_responses", "row_lines", "rows", "sample",
           "save_id", "show"]


def check_device(name: str) -> None:
    """Raise ValueError for a device this machine lacks (--device cuda without CUDA)."""
    from ..device import resolve_device

    resolve_device(name)


def check_checkpoint(path) -> str:
    """The stage of the finished checkpoint at `path` (cheap: reads config.json); ValueError
    unless there is one that can write responses: a reward model's (stage "rm") only scores them."""
    from .. import checkpoint

    if not checkpoint.is_finished(path):
        raise ValueError(f"{path}: no finished checkpoint here (a stage directory such as runs/quick/sft)")
    stage = str(checkpoint.read_meta(path).get("stage"))
    if stage == "rm":
        raise ValueError(f"{path}: a reward model's checkpoint (stage rm) scores responses, it does not write "
                         f"them; give a policy's (a stage such as runs/quick/sft or runs/quick/ppo)")
    return stage


def save_id(path) -> str | None:
    """The random id of the checkpoint's save (a new one each time the directory is written:
    a checkpoint retrained in place gets another); None for one saved before ids existed."""
    from .. import checkpoint

    return checkpoint.save_id(path)


def prompt_lengths(ckpt_dir, prompts: list) -> tuple[list[int], int]:
    """(tokens of each prompt as the policy sees it, with its chat framing; the model's
    max_seq_len), from the checkpoint's tokenizer and config alone (no model is loaded)."""
    from .. import checkpoint

    tokenizer = checkpoint.load_tokenizer(ckpt_dir)
    return [len(tokenizer.prompt_ids(p)) for p in prompts], int(checkpoint.read_meta(ckpt_dir)["model"]["max_seq_len"])


def sample(ckpt_dir, prompts: list, *, n: int, max_new_tokens: int, temperature: float, batch_size: int,
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
