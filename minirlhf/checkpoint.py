"""Atomic stage checkpoints: a directory per stage, replaced whole or not at all.

    runs/NAME/<stage>/
        model.safetensors   the stage's model (policy / reward model)
        <extra>.safetensors other models of the stage (PPO's critic)
        config.json         {"stage", "model": ModelConfig, "step", "finished", "info": {...}}
        tokenizer.model     the SentencePiece model every stage shares
        state.pt            what --resume needs: optimizer(s), step, RNG states, stage extras

A save writes everything into `<stage>.tmp/`, fsyncs each file and the directory, then
swaps it in with renames. A crash at any point leaves either the previous checkpoint or
the new one loadable: if it dies between the two renames, `<stage>.old/` is the previous
checkpoint and `load` finds it there.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from .model import ModelConfig, Transformer
from .tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer as _load_tokenizer_dir

MODEL_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "config.json", "state.pt"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path, *, stage: str, model: Transformer, tokenizer: Tokenizer, step: int, finished: bool,
         state: dict | None = None, extra_models: dict[str, Transformer] | None = None,
         info: dict | None = None) -> None:
    """Write a checkpoint of `stage` to `path` atomically (see the module docstring)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)  # debris of an earlier crash mid-save
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL_FILE))
    for name, extra in (extra_models or {}).items():
        save_model(extra, str(tmp / f"{name}.safetensors"))
    tokenizer.save(tmp)  # tokenizer.model, or tokenizer.json + chat template for imported models
    meta = {"stage": stage, "model": asdict(model.cfg), "step": step, "finished": finished,
            "extra_models": sorted(extra_models or {}), "info": info or {}}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    torch.save({"step": step, "rng": rng_state(), **(state or {})}, tmp / STATE_FILE)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
    tmp.rename(path)
    _fsync(path.parent)
    if old.exists():
        shutil.rmtree(old)


def _resolve(path) -> Path | None:
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        return path
    old = path.with_name(path.name + ".old")
    return old if (old / CONFIG_FILE).exists() else None


def exists(path) -> bool:
    return _resolve(path) is not None


def read_meta(path) -> dict:
    p = _resolve(path)
    if p is None:
        raise ValueError(f"{path}: no checkpoint here (expected {CONFIG_FILE}, {MODEL_FILE}, {TOKENIZER_FILE})")
    try:
        return json.loads((p / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{p / CONFIG_FILE}: unreadable checkpoint config: {e}") from None


def is_finished(path) -> bool:
    return exists(path) and bool(read_meta(path).get("finished"))


def load_model_from(path, name: str = "model", device="cpu") -> Transformer:
    """The model (or an extra model such as 'critic') stored in a checkpoint directory."""
    p = _resolve(path)
    meta = read_meta(path)
    model = Transformer(ModelConfig(**meta["model"]))
    load_model(model, str(p / f"{name}.safetensors"))
    return model.to(device)


def load_tokenizer(path) -> Tokenizer:
    p = _resolve(path)
    if p is None:
        raise ValueError(f"{path}: no checkpoint here")
    return _load_tokenizer_dir(p)


def load_state(path) -> dict:
    """The resume state (optimizer, step, RNG, stage extras); RNG is not restored here."""
    return torch.load(_resolve(path) / STATE_FILE, weights_only=False)
